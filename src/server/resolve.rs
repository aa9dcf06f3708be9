//! Turns `--model` values into (name, snapshot directory): a directory, `NAME=DIR`, or a
//! Hugging Face id found in the local cache. This build downloads nothing.

use std::path::{Path, PathBuf};

pub struct ModelSpec {
    pub name: String,
    pub dir: PathBuf,
}

/// The demo model served when no `--model` is given: the tiny Qwen2-VL test fixture (random
/// weights), found next to the sources this binary was built from or under the current directory.
pub fn demo() -> Result<ModelSpec, String> {
    let rel = Path::new("tests/fixtures/qwen2vl-hub");
    let candidates = [
        Path::new(env!("CARGO_MANIFEST_DIR")).join(rel),
        rel.to_path_buf(),
    ];
    let dir = candidates.iter().find(|d| d.is_dir()).ok_or_else(|| {
        format!(
            "no --model given and the demo model is not at {} or ./{}; pass --model NAME=DIR",
            candidates[0].display(),
            rel.display()
        )
    })?;
    Ok(ModelSpec {
        name: "qwen2vl-demo".into(),
        dir: dir.clone(),
    })
}

pub fn resolve(arg: &str) -> Result<ModelSpec, String> {
    // A directory whose path holds `=` (`/data/lr=1e-4/ckpt`) is a directory, not NAME=DIR.
    let (name, target) = match arg.split_once('=') {
        Some((n, t)) if !n.is_empty() && !Path::new(arg).is_dir() => (Some(n.to_string()), t),
        _ => (None, arg),
    };
    let path = Path::new(target);
    let dir = if path.is_dir() {
        path.to_path_buf()
    } else if looks_like_a_path(target) {
        return Err(format!(
            "--model {arg}: no directory {target} (a model is a snapshot directory, NAME=DIR, or \
             a Hugging Face id Org/Name from the local cache)"
        ));
    } else {
        hub_snapshot(target)?
    };
    let name = name.unwrap_or_else(|| {
        Path::new(target)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    });
    Ok(ModelSpec { name, dir })
}

/// What cannot be a hub id (`Org/Name`): an absolute or relative path, a home path, or
/// something that exists but is not a directory.
fn looks_like_a_path(target: &str) -> bool {
    target.starts_with(['/', '.', '~'])
        || target.matches('/').count() > 1
        || Path::new(target).exists()
}

/// `$HF_HUB_CACHE`, `$HF_HOME/hub` or `~/.cache/huggingface/hub`.
fn hub_cache() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        return Some(PathBuf::from(p).join("hub"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub"))
}

/// `models--Org--Name/snapshots/<the commit refs/main names>` in the cache.
fn hub_snapshot(id: &str) -> Result<PathBuf, String> {
    let not_found = |looked: String| {
        format!(
            "--model {id}: not a directory, and not in the Hugging Face cache ({looked}); this build \
             cannot download: run `huggingface-cli download {id}` where there is network, or pass a directory"
        )
    };
    if !id.contains('/') {
        return Err(not_found("not an Org/Name id".into()));
    }
    let cache = hub_cache().ok_or_else(|| not_found("no HOME or HF_HOME".into()))?;
    let repo = cache.join(format!("models--{}", id.replace('/', "--")));
    let commit = std::fs::read_to_string(repo.join("refs/main"))
        .map_err(|_| not_found(format!("looked for {}", repo.join("refs/main").display())))?;
    let dir = repo.join("snapshots").join(commit.trim());
    if dir.is_dir() {
        Ok(dir)
    } else {
        Err(not_found(format!("{} is missing", dir.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_hub_id_says_it_cannot_be_downloaded() {
        let e = resolve("NoSuchOrg/NoSuchModel-xyz").err().unwrap();
        assert!(e.contains("cannot download"), "{e}");
    }

    #[test]
    fn a_missing_path_says_so_not_how_to_download_it() {
        for arg in [
            "/no/such/dir",
            "./nope",
            "../nope",
            "~/nope",
            "a/b/c",
            "x=/nope",
        ] {
            let e = resolve(arg).err().unwrap();
            assert!(e.contains("no directory"), "{arg}: {e}");
            assert!(!e.contains("download"), "{arg}: {e}");
        }
        let file = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        assert!(resolve(file).err().unwrap().contains("no directory"));
    }

    #[test]
    fn a_directory_with_an_equals_sign_in_its_path_is_a_directory() {
        let dir = std::env::temp_dir().join(format!("logit-lens-lr=1e-4-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let spec = resolve(dir.to_str().unwrap()).unwrap();
        assert_eq!(spec.dir, dir);
        assert!(spec.name.starts_with("logit-lens-lr=1e-4"), "{}", spec.name);
        std::fs::remove_dir(&dir).unwrap();
    }

    #[test]
    fn name_equals_dir_names_the_model() {
        let dir = env!("CARGO_MANIFEST_DIR");
        let spec = resolve(&format!("mine={dir}")).unwrap();
        assert_eq!(spec.name, "mine");
        assert_eq!(spec.dir, Path::new(dir));
    }
}
