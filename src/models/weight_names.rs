//! Checkpoint weight names → the names the model code asks for, as transformers maps them.
//!
//! One snapshot's tensors may be named in any of the layouts transformers has written and still
//! reads: the hub's (legacy) names (`language_model.model.*`, `vision_tower.vision_model.*`,
//! `visual.*`), transformers' in-memory names (`model.language_model.*`, `model.vision_tower.*`), or
//! what `save_pretrained` writes for a model that was not loaded through a conversion (since
//! transformers 5.x: `vision_tower.embeddings.*`, the CLIP/SigLIP tower without its `vision_model.`
//! level). transformers reads them all through one ordered list of renamings per architecture
//! (`conversion_mapping.py`: `WeightRenaming`, `PrefixChange`). Each family here declares the same
//! list as [`Rename`]s, and every checkpoint name is carried through it to the **in-memory name of
//! the newest transformers**, which is what the model code uses. Nothing else in the loader knows
//! about layouts.

use std::collections::{BTreeSet, HashMap};

/// One renaming: a name that starts with `from`, and whose rest does not start with any of
/// `unless`, has `from` replaced by `to`. transformers' `WeightRenaming(r"^from", "to")` (with a
/// negative look-ahead for `unless`) and `PrefixChange`.
#[derive(Clone, Copy, Debug)]
pub struct Rename {
    pub from: &'static str,
    pub to: &'static str,
    pub unless: &'static [&'static str],
}

impl Rename {
    pub const fn new(from: &'static str, to: &'static str) -> Self {
        Rename {
            from,
            to,
            unless: &[],
        }
    }
    pub const fn unless(
        from: &'static str,
        to: &'static str,
        unless: &'static [&'static str],
    ) -> Self {
        Rename { from, to, unless }
    }

    fn apply(&self, name: &str) -> Option<String> {
        let rest = name.strip_prefix(self.from)?;
        if self.unless.iter().any(|u| rest.starts_with(u)) {
            return None;
        }
        Some(format!("{}{rest}", self.to))
    }
}

/// `name` carried through every rule, in order (each applies to the previous one's result).
pub fn canonical(rules: &[Rename], name: &str) -> String {
    rules
        .iter()
        .fold(name.to_string(), |n, r| r.apply(&n).unwrap_or(n))
}

/// Every name that [`canonical`] maps to `target` and that a rule could have started from: the
/// names a checkpoint may use for it, `target` itself first.
pub fn spellings(rules: &[Rename], target: &str) -> Vec<String> {
    let mut found: BTreeSet<String> = BTreeSet::from([target.to_string()]);
    for r in rules.iter().rev() {
        let more: Vec<String> = found
            .iter()
            .filter_map(|n| n.strip_prefix(r.to).map(|rest| format!("{}{rest}", r.from)))
            .collect();
        found.extend(more);
    }
    let mut out = vec![target.to_string()];
    out.extend(
        found
            .into_iter()
            .filter(|n| n != target && canonical(rules, n) == target),
    );
    out
}

/// The checkpoint's tensor names by their canonical name. Two tensors that land on the same name
/// (a snapshot holding two layouts at once) are an error naming both.
pub fn index<'a>(
    rules: &[Rename],
    names: impl IntoIterator<Item = &'a str>,
) -> Result<HashMap<String, String>, String> {
    let mut map: HashMap<String, String> = HashMap::new();
    for n in names {
        let c = canonical(rules, n);
        if let Some(other) = map.get(&c) {
            let (a, b) = if other.as_str() < n {
                (other.as_str(), n)
            } else {
                (n, other.as_str())
            };
            return Err(format!(
                "tensors {a} and {b} are both {c}: the weights mix two layouts"
            ));
        }
        map.insert(c, n.to_string());
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// transformers 5.25's "llava" mapping, then its "LlavaModel" and "CLIPVisionModel" scopes.
    const LLAVA: &[Rename] = &[
        Rename::new("language_model.lm_head.", "lm_head."),
        Rename::new("language_model.", "model.language_model."),
        Rename::new("vision_tower.", "model.vision_tower."),
        Rename::new("multi_modal_projector.", "model.multi_modal_projector."),
        Rename::new("model.language_model.model.", "model.language_model."),
        Rename::new("model.vision_tower.vision_model.", "model.vision_tower."),
    ];

    #[test]
    fn every_layout_reaches_the_in_memory_name() {
        let want = "model.vision_tower.embeddings.patch_embedding.weight";
        for n in [
            "vision_tower.vision_model.embeddings.patch_embedding.weight",
            "vision_tower.embeddings.patch_embedding.weight",
            "model.vision_tower.vision_model.embeddings.patch_embedding.weight",
            want,
        ] {
            assert_eq!(canonical(LLAVA, n), want, "{n}");
        }
        for n in [
            "language_model.model.layers.0.mlp.up_proj.weight",
            "language_model.layers.0.mlp.up_proj.weight",
            "model.language_model.layers.0.mlp.up_proj.weight",
        ] {
            assert_eq!(
                canonical(LLAVA, n),
                "model.language_model.layers.0.mlp.up_proj.weight",
                "{n}"
            );
        }
        assert_eq!(
            canonical(LLAVA, "language_model.lm_head.weight"),
            "lm_head.weight"
        );
        assert_eq!(canonical(LLAVA, "lm_head.weight"), "lm_head.weight");
    }

    #[test]
    fn spellings_are_the_names_that_map_there() {
        let s = spellings(
            LLAVA,
            "model.vision_tower.embeddings.patch_embedding.weight",
        );
        assert_eq!(s[0], "model.vision_tower.embeddings.patch_embedding.weight");
        for n in [
            "vision_tower.vision_model.embeddings.patch_embedding.weight",
            "vision_tower.embeddings.patch_embedding.weight",
            "model.vision_tower.vision_model.embeddings.patch_embedding.weight",
        ] {
            assert!(s.iter().any(|x| x == n), "{n} not in {s:?}");
        }
        for x in &s {
            assert_eq!(canonical(LLAVA, x), s[0]);
        }
    }

    #[test]
    fn unless_keeps_names_that_are_already_in_place() {
        let qwen = &[
            Rename::new("visual.", "model.visual."),
            Rename::unless(
                "model.",
                "model.language_model.",
                &["language_model.", "visual."],
            ),
        ];
        assert_eq!(
            canonical(qwen, "model.layers.0.x"),
            "model.language_model.layers.0.x"
        );
        assert_eq!(
            canonical(qwen, "visual.blocks.0.x"),
            "model.visual.blocks.0.x"
        );
        assert_eq!(
            canonical(qwen, "model.visual.blocks.0.x"),
            "model.visual.blocks.0.x"
        );
        assert_eq!(
            canonical(qwen, "model.language_model.norm.weight"),
            "model.language_model.norm.weight"
        );
        assert_eq!(canonical(qwen, "lm_head.weight"), "lm_head.weight");
    }

    #[test]
    fn two_layouts_at_once_are_refused() {
        let e = index(
            LLAVA,
            [
                "vision_tower.vision_model.post_layernorm.weight",
                "model.vision_tower.post_layernorm.weight",
            ],
        )
        .unwrap_err();
        assert!(
            e.contains("model.vision_tower.post_layernorm.weight"),
            "{e}"
        );
        assert!(e.contains("mix two layouts"), "{e}");
    }
}
