//! The dataset commands of the command line: `run` (every image × prompt, through a model loaded
//! here or a running service) and `plot` (the figures again from a saved results.jsonl). `main.rs`
//! parses the arguments and calls these.

pub mod plot;
pub mod run;

use crate::api::{Layers, LensOptions, Positions};
use crate::error::Result;

/// The lens options of `probe` and `run`, as flags.
#[derive(clap::Args, Clone, Debug)]
pub struct LensArgs {
    /// Tokens reported per layer and position (1..=100).
    #[arg(long, default_value_t = 5)]
    pub top_k: usize,
    /// last | all | text | image | comma-separated indices (negative from the end).
    #[arg(long, default_value = "last", allow_hyphen_values = true)]
    pub positions: String,
    /// all | comma-separated layer numbers (0 = embeddings, L = last block).
    #[arg(long, default_value = "all", allow_hyphen_values = true)]
    pub layers: String,
    /// Comma-separated strings whose first token is traced through the layers.
    #[arg(long, value_delimiter = ',')]
    pub targets: Vec<String>,
    /// Comma-separated raw token ids to trace.
    #[arg(long, value_delimiter = ',')]
    pub target_ids: Vec<u32>,
    /// Keep special tokens, added tokens and vocabulary rows without a token out of top-k.
    #[arg(long)]
    pub exclude_special: bool,
    /// Use the prompt verbatim (an `<image>` marker places the image) instead of the chat template.
    #[arg(long)]
    pub no_chat_template: bool,
    /// Greedily generate up to N tokens (at most 64) and read each generated position through the
    /// lens too (`answer` in the output).
    #[arg(long, default_value_t = 0)]
    pub generate: usize,
}

impl LensArgs {
    /// The options, checked where they can be before a model loads or a case runs.
    pub fn options(&self, summary: bool) -> Result<LensOptions> {
        let options = LensOptions {
            top_k: self.top_k,
            positions: Positions::parse(&self.positions)?,
            layers: Layers::parse(&self.layers)?,
            targets: self.targets.clone(),
            target_ids: self.target_ids.clone(),
            summary,
            chat_template: !self.no_chat_template,
            exclude_special: self.exclude_special,
            generate: self.generate,
        };
        options.check()?;
        Ok(options)
    }
}
