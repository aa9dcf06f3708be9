//! A model snapshot directory as the Hugging Face hub ships it, or as `save_pretrained` writes it:
//! config files, tokenizer, chat template and safetensors weights (one file or shards with an
//! index). Weights are looked up by transformers' in-memory names; every layout a checkpoint may
//! use reaches them through the family's renamings ([`weight_names`](super::weight_names)).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Shape, Tensor};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::models::weight_names::{self, Rename};

pub struct Snapshot {
    pub dir: PathBuf,
    pub config: Value,
}

impl Snapshot {
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(Error::snapshot(&dir, "is not a directory"));
        }
        let config = read_json(&dir, "config.json")?
            .ok_or_else(|| Error::snapshot(&dir, "config.json is missing"))?;
        Ok(Snapshot { dir, config })
    }

    /// The first entry of `architectures`, or the `model_type`.
    pub fn architecture(&self) -> String {
        self.config
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(|a| a.as_str())
            .or_else(|| self.config.get("model_type").and_then(|m| m.as_str()))
            .unwrap_or("<none>")
            .to_string()
    }

    pub fn json(&self, name: &str) -> Result<Option<Value>> {
        read_json(&self.dir, name)
    }

    pub fn err(&self, message: impl Into<String>) -> Error {
        Error::snapshot(&self.dir, message)
    }

    pub fn tokenizer(&self) -> Result<tokenizers::Tokenizer> {
        let path = self.dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(self.err("tokenizer.json is missing"));
        }
        tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| self.err(format!("tokenizer.json cannot be read: {e}")))
    }

    /// The chat template, from `chat_template.json`, `chat_template.jinja` or
    /// `tokenizer_config.json`, in the order transformers prefers them.
    pub fn chat_template(&self) -> Result<Option<String>> {
        if let Some(v) = self.json("chat_template.json")? {
            if let Some(t) = v.get("chat_template").and_then(|t| t.as_str()) {
                return Ok(Some(t.to_string()));
            }
        }
        let jinja = self.dir.join("chat_template.jinja");
        if jinja.is_file() {
            return std::fs::read_to_string(&jinja)
                .map(Some)
                .map_err(|e| self.err(format!("chat_template.jinja: {e}")));
        }
        if let Some(v) = self.json("tokenizer_config.json")? {
            match v.get("chat_template") {
                Some(Value::String(s)) => return Ok(Some(s.clone())),
                Some(Value::Array(list)) => {
                    let default = list
                        .iter()
                        .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"));
                    if let Some(t) = default
                        .and_then(|t| t.get("template"))
                        .and_then(|t| t.as_str())
                    {
                        return Ok(Some(t.to_string()));
                    }
                }
                _ => {}
            }
        }
        Ok(None)
    }

    /// A special token's text from `tokenizer_config.json` (`"bos_token": "<s>"` or
    /// `{"content": "<s>", ...}`), if set.
    pub fn special_token(&self, name: &str) -> Result<Option<String>> {
        let Some(cfg) = self.json("tokenizer_config.json")? else {
            return Ok(None);
        };
        Ok(match cfg.get(name) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Object(o)) => o.get("content").and_then(|c| c.as_str()).map(String::from),
            _ => None,
        })
    }

    /// The tokens that end generation: `eos_token_id` (one id or a list) of
    /// generation_config.json, else of config.json (top level or `text_config`), else the
    /// tokenizer's `eos_token`, as transformers' `generate` takes them.
    pub fn stop_ids(&self, tokenizer: &tokenizers::Tokenizer) -> Result<Vec<u32>> {
        let ids = |v: Option<&Value>| -> Vec<u32> {
            match v {
                Some(Value::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
                Some(Value::Array(a)) => a
                    .iter()
                    .filter_map(|x| x.as_u64().map(|n| n as u32))
                    .collect(),
                _ => Vec::new(),
            }
        };
        let gen = self.json("generation_config.json")?;
        let mut out = ids(gen.as_ref().and_then(|g| g.get("eos_token_id")));
        if out.is_empty() {
            out = ids(self.config.get("eos_token_id"));
        }
        if out.is_empty() {
            out = ids(self
                .config
                .get("text_config")
                .and_then(|t| t.get("eos_token_id")));
        }
        if out.is_empty() {
            if let Some(id) = self
                .special_token("eos_token")?
                .and_then(|t| tokenizer.token_to_id(&t))
            {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// The image processor's settings: `preprocessor_config.json` (hub), else the
    /// `image_processor` entry of `processor_config.json` (transformers 5).
    pub fn image_processor_config(&self) -> Result<Value> {
        if let Some(v) = self.json("preprocessor_config.json")? {
            return Ok(v);
        }
        match self.json("processor_config.json")? {
            Some(p) => Ok(p.get("image_processor").cloned().unwrap_or(p)),
            None => {
                Err(self
                    .err("neither preprocessor_config.json nor processor_config.json is present"))
            }
        }
    }

    /// The safetensors files: the shards named by `model.safetensors.index.json`, else
    /// `model.safetensors`.
    pub fn weight_files(&self) -> Result<Vec<PathBuf>> {
        if let Some(index) = self.json("model.safetensors.index.json")? {
            let map = index
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| self.err("model.safetensors.index.json has no weight_map"))?;
            let files: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
            let paths: Vec<PathBuf> = files.iter().map(|f| self.dir.join(f)).collect();
            if let Some(missing) = paths.iter().find(|p| !p.is_file()) {
                return Err(self.err(format!(
                    "the index names {} but that shard is missing",
                    missing.file_name().unwrap_or_default().to_string_lossy()
                )));
            }
            return Ok(paths);
        }
        let single = self.dir.join("model.safetensors");
        if single.is_file() {
            return Ok(vec![single]);
        }
        Err(self.err(
            "no weights: neither model.safetensors nor model.safetensors.index.json is present",
        ))
    }
}

fn read_json(dir: &Path, name: &str) -> Result<Option<Value>> {
    let path = dir.join(name);
    if !path.is_file() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(&path).map_err(|e| Error::snapshot(dir, format!("{name}: {e}")))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::snapshot(dir, format!("{name} is not valid JSON: {e}")))
}

/// Reads an optional config field, failing (rather than silently defaulting) when it is present
/// with the wrong type. `null` counts as absent, as it does for transformers.
pub fn field<T: DeserializeOwned>(v: &Value, key: &str) -> Result<Option<T>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => serde_json::from_value(x.clone()).map(Some).map_err(|e| {
            Error::Internal(format!(
                "config field `{key}` has an unexpected value {x}: {e}"
            ))
        }),
    }
}

/// The weights of a snapshot, memory-mapped, converted to `dtype` on `device` as they are read.
pub struct Weights {
    st: candle_core::safetensors::MmapedSafetensors,
    /// The checkpoint's tensor names by the name the model code uses.
    names: HashMap<String, String>,
    rules: &'static [Rename],
    family: &'static str,
    dir: PathBuf,
    pub dtype: DType,
    pub device: Device,
    /// Every checkpoint tensor loaded so far and its element count (a name counts once).
    loaded: std::sync::Mutex<std::collections::HashMap<String, usize>>,
    /// AMX packings made from these weights ([`Self::note_packed`]): the working-dtype bytes
    /// they replace, and the bytes they hold.
    packed: std::sync::Mutex<(u64, u64)>,
}

impl Weights {
    /// The snapshot's weights, named through `rules` (the family's mirror of transformers'
    /// conversion mapping; `family` names it in errors).
    pub fn open(
        snapshot: &Snapshot,
        family: &'static str,
        rules: &'static [Rename],
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let files = snapshot.weight_files()?;
        // SAFETY: the files are mapped read-only; a snapshot modified while it is being served is
        // outside what this program can guard against, as for every mmap-based loader.
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }
            .map_err(|e| snapshot.err(format!("cannot read safetensors weights: {e}")))?;
        let tensors = st.tensors();
        if device.is_cpu() {
            let packed = dtype == DType::F32 && crate::models::amx::available();
            let stored: Vec<(&str, DType, &[usize])> = tensors
                .iter()
                .map(|(n, v)| {
                    (
                        n.as_str(),
                        DType::try_from(v.dtype()).ok().unwrap_or(dtype),
                        v.shape(),
                    )
                })
                .collect();
            fits_in_memory(
                &snapshot.dir,
                held_bytes(&stored, dtype, packed),
                &format!(
                    "as {}{}",
                    format!("{dtype:?}").to_lowercase(),
                    if packed {
                        " (linears packed for AMX)"
                    } else {
                        ""
                    }
                ),
                cpu_memory_available(),
            )?;
        }
        let names = weight_names::index(rules, tensors.iter().map(|(n, _)| n.as_str()))
            .map_err(|e| snapshot.err(e))?;
        Ok(Weights {
            st,
            names,
            rules,
            family,
            dir: snapshot.dir.clone(),
            dtype,
            device: device.clone(),
            loaded: Default::default(),
            packed: Default::default(),
        })
    }

    fn resolve(&self, name: &str) -> Option<String> {
        self.names.get(name).cloned()
    }

    /// Why `name` cannot be found: the names it was looked for under, and the first few names
    /// the files hold.
    fn missing(&self, name: &str) -> Error {
        let looked: Vec<String> = weight_names::spellings(self.rules, name)
            .into_iter()
            .map(|n| format!("`{n}`"))
            .collect();
        let mut found: Vec<&str> = self.names.values().map(String::as_str).collect();
        found.sort_unstable();
        let first: Vec<String> = found.iter().take(6).map(|n| format!("`{n}`")).collect();
        Error::snapshot(
            &self.dir,
            format!(
                "weight {name} is missing: looked for it under every {} weight layout that \
                 transformers writes and reads ({}); the files hold {} tensors, the first by name: \
                 {}{}",
                self.family,
                looked.join(", "),
                found.len(),
                first.join(", "),
                if found.len() > first.len() {
                    ", ..."
                } else {
                    ""
                }
            ),
        )
    }

    pub fn contains(&self, name: &str) -> bool {
        self.resolve(name).is_some()
    }

    /// Loads `name`, checks its shape, converts it to the working dtype and device.
    pub fn get(&self, name: &str, shape: impl Into<Shape>) -> Result<Tensor> {
        Ok(self.get_stored(name, shape)?.to_dtype(self.dtype)?)
    }

    /// [`Self::get`] without the conversion: the tensor in the dtype the files store it, on the
    /// device (for weights packed from their stored values, [`crate::models::amx::pack`]).
    pub fn get_stored(&self, name: &str, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        let t = self.get_stored_any_shape(name)?;
        if t.shape() != &shape {
            return Err(Error::snapshot(
                &self.dir,
                format!(
                    "weight {name} has shape {:?}, the config implies {:?}",
                    t.dims(),
                    shape.dims()
                ),
            ));
        }
        Ok(t)
    }

    pub fn get_any_shape(&self, name: &str) -> Result<Tensor> {
        Ok(self.get_stored_any_shape(name)?.to_dtype(self.dtype)?)
    }

    fn get_stored_any_shape(&self, name: &str) -> Result<Tensor> {
        let actual = self.resolve(name).ok_or_else(|| self.missing(name))?;
        let t = self
            .st
            .load(&actual, &self.device)
            .map_err(|e| Error::snapshot(&self.dir, format!("weight {actual}: {e}")))?;
        if let Ok(mut loaded) = self.loaded.lock() {
            loaded.insert(actual, t.elem_count());
        }
        Ok(t)
    }

    /// The parameters loaded so far, and the bytes they hold where they live (on the GPU, the
    /// card's share of the model): their size in the working dtype, except that a weight held as
    /// its AMX packing counts as the packing's bytes, and a packed copy kept beside its tensor
    /// (the lens's unembedding) adds its bytes ([`Self::note_packed`]).
    pub fn loaded(&self) -> (u64, u64) {
        let params: u64 = self
            .loaded
            .lock()
            .map(|l| l.values().map(|&n| n as u64).sum())
            .unwrap_or(0);
        let (replaced, packed) = self.packed.lock().map(|p| *p).unwrap_or_default();
        (
            params,
            (params * self.dtype.size_in_bytes() as u64 + packed).saturating_sub(replaced),
        )
    }

    /// Records an AMX packing of `bytes` made from a weight of `elements` values: held in place of
    /// the weight's working-dtype tensor (`replaces`: a `Linear`'s), or beside it (the lens's copy
    /// of the unembedding).
    pub fn note_packed(&self, elements: usize, bytes: usize, replaces: bool) {
        if let Ok(mut p) = self.packed.lock() {
            if replaces {
                p.0 += (elements * self.dtype.size_in_bytes()) as u64;
            }
            p.1 += bytes as u64;
        }
    }

    pub fn pp(&self, prefix: impl AsRef<str>) -> Prefixed<'_> {
        Prefixed {
            w: self,
            prefix: format!("{}.", prefix.as_ref()),
        }
    }
}

/// A view of the weights under a name prefix, like candle's `VarBuilder::pp`.
pub struct Prefixed<'a> {
    w: &'a Weights,
    prefix: String,
}

impl<'a> Prefixed<'a> {
    pub fn pp(&self, sub: impl AsRef<str>) -> Prefixed<'a> {
        Prefixed {
            w: self.w,
            prefix: format!("{}{}.", self.prefix, sub.as_ref()),
        }
    }
    pub fn get(&self, name: &str, shape: impl Into<Shape>) -> Result<Tensor> {
        self.w.get(&format!("{}{name}", self.prefix), shape)
    }
    /// [`Weights::get_stored`]: in the files' dtype.
    pub fn get_stored(&self, name: &str, shape: impl Into<Shape>) -> Result<Tensor> {
        self.w.get_stored(&format!("{}{name}", self.prefix), shape)
    }
    /// The dtype the model computes in.
    pub fn dtype(&self) -> DType {
        self.w.dtype
    }
    /// A `Linear` from its weight and bias as the files store them
    /// ([`crate::models::layers::Linear::new`]); a weight held as its AMX packing is counted as such
    /// in [`Weights::loaded`].
    pub fn linear(
        &self,
        weight: Tensor,
        bias: Option<Tensor>,
    ) -> Result<crate::models::layers::Linear> {
        let linear = crate::models::layers::Linear::new(weight, bias, self.w.dtype)?;
        if let Some((elements, bytes)) = linear.packed_size() {
            self.w.note_packed(elements, bytes, true);
        }
        Ok(linear)
    }
    pub fn contains(&self, name: &str) -> bool {
        self.w.contains(&format!("{}{name}", self.prefix))
    }
    /// Tensor `name` of the sub-modules `subs` (`(prefix, rows)`), stacked along the first
    /// dimension: q, k and v projections as one matrix, so that one GEMM computes all three.
    /// `rest` is the shape after the first dimension (`[in]` for weights, `[]` for biases). In the
    /// files' dtype, as [`Self::get_stored`] (for [`crate::models::layers::Linear::new`]).
    pub fn stacked(&self, subs: &[(&str, usize)], name: &str, rest: &[usize]) -> Result<Tensor> {
        let parts = subs
            .iter()
            .map(|(sub, rows)| {
                let shape: Vec<usize> =
                    std::iter::once(*rows).chain(rest.iter().copied()).collect();
                self.pp(sub).get_stored(name, shape)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }
}

/// Bytes the CPU holds for the checkpoint's tensors (`(name, stored dtype, shape)`) when the model
/// computes in `dtype`: each converted to `dtype`, except, for an f32 model on a CPU with AMX
/// (`amx`: [`crate::models::amx::pack`]), a 2-D weight stored in bf16 or f16, which a `Linear` holds as its
/// packing only (2 bytes a value for bf16: one piece; 4 for f16: two). The vocabulary tables
/// (`…embed_tokens.weight`, `…lm_head.weight`) stay in `dtype`, and the lens packs one of them
/// beside it (the `lm_head` if the files have one, else the embeddings). The few 2-D tensors that
/// are not linears (position embeddings: a few MB) count as packed too.
fn held_bytes(tensors: &[(&str, DType, &[usize])], dtype: DType, amx: bool) -> u64 {
    let packed = amx && dtype == DType::F32;
    let table = |n: &str| n.ends_with("embed_tokens.weight") || n.ends_with("lm_head.weight");
    let has_lm_head = tensors.iter().any(|(n, ..)| n.ends_with("lm_head.weight"));
    let pack_size = |stored: DType| match stored {
        DType::BF16 => Some(2),
        DType::F16 => Some(4),
        _ => None,
    };
    tensors
        .iter()
        .map(|&(name, stored, shape)| {
            let n = shape.iter().product::<usize>() as u64;
            let working = n * dtype.size_in_bytes() as u64;
            let Some(pack) = pack_size(stored).filter(|_| packed && shape.len() == 2) else {
                return working;
            };
            if !table(name) {
                n * pack
            } else if name.ends_with("lm_head.weight") || !has_lm_head {
                working + n * pack
            } else {
                working
            }
        })
        .sum()
}

/// Refuses, before reading them, weights that cannot fit in the memory left on the CPU: past it the
/// kernel's out-of-memory killer ends the process without a word, after a minute of paging
/// (LLaVA-1.5-7B in f32 is 27 GB; a 24 GiB machine was killed 51 s into loading it). Every tensor of
/// the files counts (the few a model leaves unused, e.g. CLIP's last layer for LLaVA, are tens of MB)
/// and activations come on top, so only what could not run anyway is refused. `available`: None
/// where it cannot be read.
/// `held`: how they are held (`as f32 …`), for the message.
fn fits_in_memory(dir: &Path, needed: u64, held: &str, available: Option<u64>) -> Result<()> {
    let Some(available) = available else {
        return Ok(());
    };
    if needed <= available {
        return Ok(());
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    Err(Error::snapshot(
        dir,
        format!(
            "its weights need {:.1} GiB {held} on the CPU and {:.1} GiB of memory is available; \
             run it on a GPU (--device cuda: the checkpoint's half precision), in half precision on \
             the CPU (--dtype bf16), or on a machine with more memory",
            gib(needed),
            gib(available)
        ),
    ))
}

/// Memory this process may still take: what the kernel can give without swapping (`MemAvailable`)
/// plus free swap, and no more than the cgroup's limit leaves (a container's limit does not show
/// in /proc/meminfo). None off Linux.
fn cpu_memory_available() -> Option<u64> {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let host = meminfo_available(&read("/proc/meminfo")?)?;
    let cgroup = cgroup_available(
        &read("/sys/fs/cgroup/memory.max").unwrap_or_default(),
        &read("/sys/fs/cgroup/memory.current").unwrap_or_default(),
        &read("/sys/fs/cgroup/memory.stat").unwrap_or_default(),
    );
    Some(cgroup.map_or(host, |c| c.min(host)))
}

/// `MemAvailable` + `SwapFree` from /proc/meminfo's text, in bytes.
fn meminfo_available(meminfo: &str) -> Option<u64> {
    let field = |name: &str| {
        meminfo.lines().find_map(|l| {
            let kb = l.strip_prefix(name)?.trim().strip_suffix("kB")?.trim();
            kb.parse::<u64>().ok().map(|kb| kb * 1024)
        })
    };
    Some(field("MemAvailable:")? + field("SwapFree:").unwrap_or(0))
}

/// cgroup v2: the limit less what is charged, not counting the page cache (reclaimable; the mapped
/// weight files themselves land there). None without a numeric limit (`max`, or no cgroup v2).
fn cgroup_available(max: &str, current: &str, stat: &str) -> Option<u64> {
    let max: u64 = max.trim().parse().ok()?;
    let current: u64 = current.trim().parse().ok()?;
    let file = stat
        .lines()
        .find_map(|l| l.strip_prefix("file ")?.trim().parse::<u64>().ok())
        .unwrap_or(0);
    Some(max.saturating_sub(current.saturating_sub(file)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_larger_than_the_memory_left_are_refused_with_both_sizes() {
        let dir = Path::new("/models/llava");
        let gib = 1u64 << 30;
        assert!(fits_in_memory(dir, 27 * gib, "as f32", Some(28 * gib)).is_ok());
        assert!(fits_in_memory(dir, 27 * gib, "as f32", None).is_ok());
        let e = fits_in_memory(dir, 27 * gib, "as f32", Some(22 * gib)).unwrap_err();
        assert_eq!(e.code(), "model_snapshot");
        let m = e.to_string();
        assert!(
            m.contains("27.0 GiB as f32") && m.contains("22.0 GiB of memory is available"),
            "{m}"
        );
    }

    /// With AMX, a bf16 linear is held in 2 bytes a value and an f16 one in 4; norms, biases,
    /// convolutions and the embeddings in f32; the lens's table once more, packed.
    #[test]
    fn memory_held_counts_linears_as_their_amx_packing() {
        let (bf, h, f) = (DType::BF16, DType::F16, DType::F32);
        let untied: [(&str, DType, &[usize]); 5] = [
            ("model.embed_tokens.weight", bf, &[1000, 64]),
            ("model.layers.0.mlp.up_proj.weight", bf, &[256, 64]),
            ("model.layers.0.input_layernorm.weight", bf, &[64]),
            ("visual.patch_embed.proj.weight", bf, &[64, 3, 2, 14, 14]),
            ("lm_head.weight", bf, &[1000, 64]),
        ];
        let convs = 64 * 3 * 2 * 14 * 14;
        let f32s = 4 * (2 * 64_000 + 256 * 64 + 64 + convs) as u64;
        assert_eq!(held_bytes(&untied, f, false), f32s);
        assert_eq!(held_bytes(&untied, bf, true), f32s / 2);
        let amx = 4 * 64_000 + (4 + 2) * 64_000 + 2 * 256 * 64 + 4 * (64 + convs) as u64;
        assert_eq!(held_bytes(&untied, f, true), amx);
        // Tied: the embeddings are the lens's table.
        assert_eq!(held_bytes(&untied[..4], f, true), amx - 4 * 64_000);
        // f16 linears: two pieces; f32-stored ones stay f32.
        let other: [(&str, DType, &[usize]); 2] = [
            (
                "language_model.model.layers.0.mlp.up_proj.weight",
                h,
                &[256, 64],
            ),
            (
                "vision_tower.encoder.layers.0.mlp.fc1.weight",
                f,
                &[256, 64],
            ),
        ];
        assert_eq!(held_bytes(&other, f, true), 4 * 256 * 64 * 2);
    }

    #[test]
    fn available_memory_is_read_from_meminfo_and_the_cgroup() {
        let meminfo = "MemTotal:       24683000 kB\nMemFree:         1000000 kB\n\
                       MemAvailable:   20000000 kB\nSwapTotal:       4000000 kB\nSwapFree:        3000000 kB\n";
        assert_eq!(meminfo_available(meminfo), Some(23_000_000 * 1024));
        assert_eq!(meminfo_available("MemFree: 5 kB\n"), None);
        // 16 GiB limit, 10 GiB charged of which 6 GiB page cache: 12 GiB left.
        let g = 1u64 << 30;
        let stat = format!("anon {}\nfile {}\nkernel 0\n", 4 * g, 6 * g);
        assert_eq!(
            cgroup_available(&format!("{}\n", 16 * g), &format!("{}\n", 10 * g), &stat),
            Some(12 * g)
        );
        assert_eq!(cgroup_available("max\n", "123\n", ""), None);
        assert_eq!(cgroup_available("", "", ""), None);
        // This machine (Linux): some memory, readable.
        #[cfg(target_os = "linux")]
        assert!(cpu_memory_available().is_some_and(|b| b > 0));
    }
}
