//! `logit-lens plot results.jsonl --out DIR`: summary.csv and every figure again from saved
//! results (error records skipped), with the code `run` uses.

use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::report::{self, Redraw, Results};

#[derive(clap::Args, Debug)]
pub struct PlotArgs {
    /// A results.jsonl written by `logit-lens run`.
    pub results: PathBuf,
    /// Where summary.csv and figures/ go (the run's own folder redraws in place).
    #[arg(long)]
    pub out: PathBuf,
    /// The prompts file of the run, to order the prompts as it does (default: as they first
    /// appear in results.jsonl).
    #[arg(long)]
    pub prompts: Option<PathBuf>,
}

pub fn plot(args: PlotArgs) -> Result<()> {
    if !args.results.is_file() {
        return Err(Error::InvalidOption(format!(
            "{}: no such file; give the results.jsonl that `logit-lens run` wrote",
            args.results.display()
        )));
    }
    let results = Results::read(&args.results)?;
    results.warn();
    let cases = report::cases(&results)?;
    let errors = results
        .latest()
        .iter()
        .filter(|r| r.error.is_some())
        .count();
    if cases.is_empty() {
        return Err(Error::InvalidOption(format!(
            "{}: no successful case to draw ({errors} error records)",
            args.results.display()
        )));
    }
    let prompts = match &args.prompts {
        Some(p) => super::run::read_prompts(p)?,
        None => Vec::new(),
    };
    std::fs::create_dir_all(&args.out).map_err(|e| {
        Error::InvalidOption(format!(
            "--out {}: cannot create it: {e}",
            args.out.display()
        ))
    })?;
    let written = report::write_report(&cases, &prompts, &args.out, Redraw::All)?;
    say!(
        "{} cases ({} error records skipped): {}, {} case figures and {} prompt figures under {}",
        cases.len(),
        errors,
        written.summary.display(),
        written.case_figures,
        written.prompt_figures,
        args.out.join("figures").display()
    );
    Ok(())
}
