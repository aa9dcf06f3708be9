//! Qwen2-VL's 3-D position ids for M-RoPE (transformers' `get_rope_index`). The decoder itself
//! is the shared Qwen2 decoder in `models::decoder`.

/// transformers' `get_rope_index` for one sequence: text tokens advance all three axes together;
/// the `rows × cols` merged tokens of an image share the temporal position and spread over
/// height and width; after the image, positions resume at `start + max(rows, cols)`.
pub fn rope_positions(len: usize, image: Option<(usize, usize, usize)>) -> Vec<[u32; 3]> {
    let mut out = Vec::with_capacity(len);
    let mut next = 0u32;
    let mut i = 0;
    while i < len {
        match image {
            Some((first, rows, cols)) if i == first => {
                for r in 0..rows {
                    for c in 0..cols {
                        out.push([next, next + r as u32, next + c as u32]);
                    }
                }
                next += rows.max(cols) as u32;
                i += rows * cols;
            }
            _ => {
                out.push([next; 3]);
                next += 1;
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_follow_models_md_example() {
        // 15 text tokens, a 2×3 merged image, then 2 text tokens.
        let p = rope_positions(15 + 6 + 2, Some((15, 2, 3)));
        assert_eq!(p[14], [14, 14, 14]);
        assert_eq!(p[15], [15, 15, 15]);
        assert_eq!(p[15 + 5], [15, 16, 17]);
        assert_eq!(p[21], [18, 18, 18], "resumes at 15 + max(2, 3)");
        assert_eq!(rope_positions(3, None), vec![[0; 3], [1; 3], [2; 3]]);
    }
}
