//! What `logit-lens run` and `logit-lens plot` write for a dataset: `results.jsonl` (one line per
//! image × prompt case), `summary.csv` (per prompt and layer, over images) and the figures.
//!
//! `run` appends each finished case to `results.jsonl` and then calls [`write_report`], the same
//! code `plot` calls on a saved file, so the figures of a run and of a redraw are the same.

pub mod figure;
pub mod summary;

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::api::LensResponse;
use crate::error::{Error, Result};

/// Why a case failed: the API's error code and message (or the client's, e.g. `connection`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CaseError {
    pub code: String,
    pub message: String,
}

/// One line of `results.jsonl`: the case's key (image and prompt) and either the /lens response
/// body, verbatim, or the error that case met.
#[derive(Debug, Serialize, Deserialize)]
pub struct Record {
    /// The image's path relative to `--images` (`/`-separated).
    pub image: String,
    pub prompt: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<Box<RawValue>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<CaseError>,
}

impl Record {
    pub fn ok(image: &str, prompt: &str, body: Box<RawValue>) -> Record {
        Record {
            image: image.into(),
            prompt: prompt.into(),
            response: Some(body),
            error: None,
        }
    }

    pub fn failed(image: &str, prompt: &str, error: CaseError) -> Record {
        Record {
            image: image.into(),
            prompt: prompt.into(),
            response: None,
            error: Some(error),
        }
    }

    pub fn key(&self) -> (&str, &str) {
        (&self.image, &self.prompt)
    }

    /// The response, typed (unknown fields a newer server adds are ignored).
    pub fn lens(&self) -> Option<Result<LensResponse>> {
        self.response.as_ref().map(|raw| {
            serde_json::from_str(raw.get()).map_err(|e| {
                Error::Internal(format!(
                    "the response for {} × {:?} is not a /lens body: {e}",
                    self.image, self.prompt
                ))
            })
        })
    }
}

/// `results.jsonl` as read back: the records of its complete lines, and what had to be left out.
pub struct Results {
    pub path: PathBuf,
    /// Every valid record, in file order (a case retried later appears again further down).
    pub records: Vec<Record>,
    /// 1-based numbers of lines that are not records (skipped, with a warning).
    pub bad_lines: Vec<usize>,
    /// The file ends in a line cut off mid-write (a killed run): its bytes are not a record.
    pub torn_tail: bool,
    /// Bytes up to the end of the last valid line, and whether that line lacks its newline.
    valid_len: u64,
    missing_newline: bool,
}

impl Results {
    /// Reads `path`; a missing file is an empty result set.
    pub fn read(path: &Path) -> Result<Results> {
        let text = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                return Err(Error::Internal(format!(
                    "cannot read {}: {e}",
                    path.display()
                )))
            }
        };
        let mut out = Results {
            path: path.to_path_buf(),
            records: Vec::new(),
            bad_lines: Vec::new(),
            torn_tail: false,
            valid_len: 0,
            missing_newline: false,
        };
        let mut start = 0usize;
        let mut number = 0usize;
        while start < text.len() {
            number += 1;
            let (end, complete) = match text[start..].iter().position(|&b| b == b'\n') {
                Some(i) => (start + i + 1, true),
                None => (text.len(), false),
            };
            let line = &text[start..end];
            let parsed = std::str::from_utf8(line)
                .ok()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(|l| serde_json::from_str::<Record>(l).ok().filter(valid));
            match parsed {
                // A blank line.
                None if std::str::from_utf8(line).is_ok_and(|l| l.trim().is_empty()) => {
                    if complete {
                        out.valid_len = end as u64;
                        out.missing_newline = false;
                    }
                }
                Some(Some(record)) => {
                    out.records.push(record);
                    out.valid_len = end as u64;
                    out.missing_newline = !complete;
                }
                _ if !complete => out.torn_tail = true,
                _ => {
                    out.bad_lines.push(number);
                    out.valid_len = end as u64;
                    out.missing_newline = false;
                }
            }
            start = end;
        }
        Ok(out)
    }

    /// The latest record of each case, in the order of their first appearance.
    pub fn latest(&self) -> Vec<&Record> {
        let mut index: HashMap<(&str, &str), usize> = HashMap::new();
        let mut out: Vec<&Record> = Vec::new();
        for r in &self.records {
            match index.get(&r.key()) {
                Some(&i) => out[i] = r,
                None => {
                    index.insert(r.key(), out.len());
                    out.push(r);
                }
            }
        }
        out
    }

    /// Prints what was skipped on reading.
    pub fn warn(&self) {
        if self.torn_tail {
            say!(
                "warning: {} ends in a line cut off mid-write (a run was killed); it is dropped and that case runs again",
                self.path.display()
            );
        }
        if !self.bad_lines.is_empty() {
            const SHOWN: usize = 10;
            let n = self.bad_lines.len();
            let more = if n > SHOWN {
                format!(" and {} more", n - SHOWN)
            } else {
                String::new()
            };
            say!(
                "warning: {}: {n} lines are not result records ({:?}{more}); ignored",
                self.path.display(),
                &self.bad_lines[..n.min(SHOWN)],
            );
        }
    }

    /// Opens the file for appending, after cutting off a torn last line (and ending a complete
    /// last record that lacks its newline), so new lines start clean.
    pub fn append(&self) -> Result<ResultsLog> {
        let io = |e: std::io::Error| {
            Error::Internal(format!("cannot write {}: {e}", self.path.display()))
        };
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.path)
            .and_then(|f| f.set_len(self.valid_len))
            .map_err(io)?;
        // O_APPEND: every line lands at the end, whole, whatever else writes to the file.
        let mut file = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(io)?;
        if self.missing_newline {
            file.write_all(b"\n").map_err(io)?;
        }
        Ok(ResultsLog {
            file,
            path: self.path.clone(),
        })
    }
}

/// A record needs exactly one of `response` and `error`.
fn valid(r: &Record) -> bool {
    r.response.is_some() != r.error.is_some()
}

/// `results.jsonl` open for appending: one line per finished case, handed to the operating
/// system as soon as the case is done, so that a killed run loses nothing it finished.
pub struct ResultsLog {
    file: File,
    path: PathBuf,
}

impl ResultsLog {
    pub fn append(&mut self, record: &Record) -> Result<()> {
        let mut line = serde_json::to_string(record)
            .map_err(|e| Error::Internal(format!("cannot encode a result record: {e}")))?;
        line.push('\n');
        // One write of the whole line: a kill can only cut the last line, which reading drops.
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.flush())
            .map_err(|e| Error::Internal(format!("cannot write {}: {e}", self.path.display())))
    }
}

/// Rewrites `results.jsonl` with one line per case (the latest), in `order` (cases not in it
/// keep their place after those that are), through a temporary file and a rename.
pub fn compact(results: &Results, order: &[(String, String)]) -> Result<()> {
    let latest = results.latest();
    let rank: HashMap<(&str, &str), usize> = order
        .iter()
        .enumerate()
        .map(|(i, (a, b))| ((a.as_str(), b.as_str()), i))
        .collect();
    let mut sorted: Vec<(usize, usize, &Record)> = latest
        .iter()
        .enumerate()
        .map(|(i, r)| (rank.get(&r.key()).copied().unwrap_or(usize::MAX), i, *r))
        .collect();
    sorted.sort_by_key(|&(rank, i, _)| (rank, i));
    let same = sorted.len() == results.records.len()
        && sorted
            .iter()
            .zip(&results.records)
            .all(|((_, _, a), b)| std::ptr::eq(*a, b))
        && results.bad_lines.is_empty()
        && !results.torn_tail
        && !results.missing_newline;
    if same {
        return Ok(());
    }
    let mut text = String::new();
    for (_, _, r) in sorted {
        text.push_str(
            &serde_json::to_string(r)
                .map_err(|e| Error::Internal(format!("cannot encode a result record: {e}")))?,
        );
        text.push('\n');
    }
    write_atomically(&results.path, text.as_bytes())
}

/// Writes through `<path>.tmp` and a rename, so readers see the old file or the new one.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |e: std::io::Error| Error::Internal(format!("cannot write {}: {e}", path.display()));
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = File::create(&tmp).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io)
}

/// One successful case, typed.
pub struct Case {
    pub image: String,
    pub prompt: String,
    pub response: LensResponse,
}

/// The successful cases among the latest records (error records are skipped).
pub fn cases(results: &Results) -> Result<Vec<Case>> {
    results
        .latest()
        .into_iter()
        .filter_map(|r| {
            r.lens().map(|l| {
                l.map(|response| Case {
                    image: r.image.clone(),
                    prompt: r.prompt.clone(),
                    response,
                })
            })
        })
        .collect()
}

/// Prompts in `preferred` order first (those present), then the others by first appearance.
pub fn prompt_order(cases: &[Case], preferred: &[String]) -> Vec<String> {
    let present: HashSet<&str> = cases.iter().map(|c| c.prompt.as_str()).collect();
    let mut seen: HashSet<String> = HashSet::new();
    let mut out = Vec::new();
    for p in preferred
        .iter()
        .map(String::as_str)
        .chain(cases.iter().map(|c| c.prompt.as_str()))
    {
        if present.contains(p) && seen.insert(p.to_string()) {
            out.push(p.to_string());
        }
    }
    out
}

/// What [`write_report`] draws.
pub enum Redraw<'a> {
    /// Every case figure.
    All,
    /// Only these cases' figures (and those whose files are missing).
    Only(&'a HashSet<(String, String)>),
    /// No figures: summary.csv only.
    Nothing,
}

/// What [`write_report`] wrote.
pub struct Written {
    pub summary: PathBuf,
    pub case_figures: usize,
    pub prompt_figures: usize,
}

/// Writes `summary.csv`, a PNG and an SVG per case under `figures/cases/`, one per prompt under
/// `figures/prompts/`, and `figures/index.csv` (which file shows which case), into `out`.
pub fn write_report(
    cases: &[Case],
    preferred_prompts: &[String],
    out: &Path,
    redraw: Redraw,
) -> Result<Written> {
    let prompts = prompt_order(cases, preferred_prompts);
    let mut sorted: Vec<&Case> = cases.iter().collect();
    let prompt_rank: HashMap<&str, usize> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| (p.as_str(), i))
        .collect();
    sorted.sort_by(|a, b| {
        (prompt_rank[a.prompt.as_str()], &a.image).cmp(&(prompt_rank[b.prompt.as_str()], &b.image))
    });

    let rows = summary::summarize(&sorted, &prompts);
    let summary_path = out.join("summary.csv");
    summary::write_csv(&rows, &summary_path)?;

    if matches!(redraw, Redraw::Nothing) {
        return Ok(Written {
            summary: summary_path,
            case_figures: 0,
            prompt_figures: 0,
        });
    }
    let cases_dir = out.join("figures").join("cases");
    let prompts_dir = out.join("figures").join("prompts");
    for d in [&cases_dir, &prompts_dir] {
        std::fs::create_dir_all(d)
            .map_err(|e| Error::Internal(format!("cannot create {}: {e}", d.display())))?;
    }
    let mut index = csv::Writer::from_writer(Vec::new());
    let csv_err = |e: csv::Error| Error::Internal(format!("cannot write figures/index.csv: {e}"));
    index
        .write_record(["kind", "image", "prompt", "png", "svg"])
        .map_err(csv_err)?;

    let case_jobs: Vec<(&Case, PathBuf)> = sorted
        .iter()
        .map(|c| (*c, cases_dir.join(figure::case_stem(&c.image, &c.prompt))))
        .collect();
    for (c, stem) in &case_jobs {
        index
            .write_record([
                "case",
                &c.image,
                &c.prompt,
                &relative(out, &figure::with_ext(stem, "png")),
                &relative(out, &figure::with_ext(stem, "svg")),
            ])
            .map_err(csv_err)?;
    }
    let drawn: Vec<Result<bool>> = case_jobs
        .par_iter()
        .map(|(c, stem)| {
            let (png, svg) = (figure::with_ext(stem, "png"), figure::with_ext(stem, "svg"));
            let wanted = match &redraw {
                Redraw::All => true,
                Redraw::Nothing => false,
                Redraw::Only(set) => {
                    set.contains(&(c.image.clone(), c.prompt.clone()))
                        || !png.exists()
                        || !svg.exists()
                }
            };
            if wanted {
                figure::case_figure(c, &png, &svg)?;
            }
            Ok(wanted)
        })
        .collect();
    let mut case_figures = 0;
    for d in drawn {
        case_figures += d? as usize;
    }

    let by_prompt: Vec<(&String, Vec<&Case>)> = prompts
        .iter()
        .map(|p| {
            (
                p,
                sorted.iter().copied().filter(|c| &c.prompt == p).collect(),
            )
        })
        .collect();
    for (p, _) in &by_prompt {
        let stem = prompts_dir.join(figure::prompt_stem(p));
        index
            .write_record([
                "prompt",
                "",
                p.as_str(),
                &relative(out, &figure::with_ext(&stem, "png")),
                &relative(out, &figure::with_ext(&stem, "svg")),
            ])
            .map_err(csv_err)?;
    }
    by_prompt
        .par_iter()
        .map(|(p, cs)| {
            let stem = prompts_dir.join(figure::prompt_stem(p));
            let rows: Vec<&summary::Row> = rows.iter().filter(|r| &&r.prompt == p).collect();
            figure::prompt_figure(
                p,
                cs,
                &rows,
                &figure::with_ext(&stem, "png"),
                &figure::with_ext(&stem, "svg"),
            )
        })
        .collect::<Result<Vec<()>>>()?;
    let index = index
        .into_inner()
        .map_err(|e| Error::Internal(format!("cannot write figures/index.csv: {e}")))?;
    write_atomically(&out.join("figures").join("index.csv"), &index)?;
    Ok(Written {
        summary: summary_path,
        case_figures,
        prompt_figures: by_prompt.len(),
    })
}

fn relative(base: &Path, p: &Path) -> String {
    p.strip_prefix(base)
        .unwrap_or(p)
        .to_string_lossy()
        .replace('\\', "/")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(image: &str, ok: bool) -> String {
        if ok {
            format!(r#"{{"image":"{image}","prompt":"p","response":{{"layers":[]}}}}"#)
        } else {
            format!(
                r#"{{"image":"{image}","prompt":"p","error":{{"code":"invalid_image","message":"m"}}}}"#
            )
        }
    }

    #[test]
    fn reading_keeps_whole_records_and_appending_starts_on_a_clean_line() {
        let path = std::env::temp_dir().join(format!("ll-results-{}.jsonl", std::process::id()));
        // A retried case, a blank line, a garbage line, and a last record without its newline.
        let text = format!(
            "{}\n\n{}\nnot json\n{}\n{}",
            line("a", false),
            line("b", true),
            line("a", true),
            line("c", true)
        );
        std::fs::write(&path, &text).unwrap();
        let r = Results::read(&path).unwrap();
        assert_eq!(r.records.len(), 4);
        assert_eq!(r.bad_lines, [4]);
        assert!(!r.torn_tail);
        let latest: Vec<(&str, bool)> = r
            .latest()
            .iter()
            .map(|x| (x.image.as_str(), x.response.is_some()))
            .collect();
        assert_eq!(latest, [("a", true), ("b", true), ("c", true)]);
        r.append()
            .unwrap()
            .append(&Record::failed(
                "d",
                "p",
                CaseError {
                    code: "x".into(),
                    message: "y".into(),
                },
            ))
            .unwrap();
        let again = Results::read(&path).unwrap();
        assert_eq!(again.records.len(), 5, "c kept, d on its own line");

        // A line cut mid-write is dropped, and cut off the file before the next append.
        std::fs::write(
            &path,
            format!("{}\n{}", line("a", true), &line("b", true)[..20]),
        )
        .unwrap();
        let r = Results::read(&path).unwrap();
        assert!(r.torn_tail);
        assert_eq!(r.records.len(), 1);
        r.append().unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{}\n", line("a", true))
        );

        // Compaction: one line per case, in the given order.
        std::fs::write(&path, text).unwrap();
        let r = Results::read(&path).unwrap();
        compact(&r, &[("c".into(), "p".into()), ("a".into(), "p".into())]).unwrap();
        let images: Vec<String> = Results::read(&path)
            .unwrap()
            .records
            .iter()
            .map(|x| x.image.clone())
            .collect();
        assert_eq!(images, ["c", "a", "b"]);
        let _ = std::fs::remove_file(&path);
    }
}
