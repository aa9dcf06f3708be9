//! The `logit-lens` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use logit_lens::cli::plot::PlotArgs;
use logit_lens::cli::run::RunArgs;
use logit_lens::cli::LensArgs;
use logit_lens::engine::{run_lens, LensRequest};
use logit_lens::preprocess::image::decode;
use logit_lens::{models, Error, Result};

#[derive(Parser)]
#[command(
    name = "logit-lens",
    version,
    about = "The logit lens for vision-language models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
// Parsed once at start-up: the size of the variants does not matter.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Runs the lens once and prints the JSON body that POST /lens returns.
    Probe(ProbeArgs),
    /// Serves POST /lens and friends over HTTP (see /docs once it runs).
    Serve(logit_lens::server::ServeArgs),
    /// Runs the lens on every image × prompt of a dataset (in this process or against a server)
    /// and writes results.jsonl, summary.csv and figures; resumes where a previous run stopped.
    Run(RunArgs),
    /// Draws summary.csv and the figures again from a results.jsonl.
    Plot(PlotArgs),
    /// Prints the OpenAPI document (`logit-lens openapi > openapi/openapi.json` updates it).
    Openapi,
}

#[derive(clap::Args)]
struct ProbeArgs {
    /// A model: a snapshot directory (Hugging Face layout), NAME=DIR, or a Hugging Face id such as
    /// Qwen/Qwen2-VL-2B-Instruct read from the local Hugging Face cache (as `serve --model`).
    #[arg(long, env = "LOGIT_LENS_MODEL")]
    model: String,
    /// An image file (PNG, JPEG, WebP, GIF, BMP, TIFF); leave out for a text-only prompt.
    #[arg(long)]
    image: Option<PathBuf>,
    #[arg(long)]
    prompt: String,
    #[command(flatten)]
    lens: LensArgs,
    /// Skip the per-layer mean max probability over all positions.
    #[arg(long)]
    no_summary: bool,
    /// The model name reported in the response (default: NAME of NAME=DIR, else the directory's
    /// or the id's last part).
    #[arg(long)]
    name: Option<String>,
    /// Run the request this many times after loading, for timing; prints the last response.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    repeat: u32,
    /// auto (the GPU when built with CUDA and one is present), cpu, cuda or cuda:N.
    #[arg(long, env = "LOGIT_LENS_DEVICE", default_value = "auto")]
    device: String,
    /// auto (f32 on the CPU, the checkpoint's dtype on a GPU), f32, bf16 or f16.
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// Pretty-print the JSON.
    #[arg(long)]
    pretty: bool,
}

fn probe(a: ProbeArgs) -> Result<()> {
    let options = a.lens.options(!a.no_summary)?;
    let image = match &a.image {
        Some(p) => {
            let bytes = std::fs::read(p)
                .map_err(|e| Error::InvalidImage(format!("cannot read {}: {e}", p.display())))?;
            Some(decode(&bytes)?)
        }
        None => None,
    };
    let spec = logit_lens::server::resolve::resolve(&a.model).map_err(Error::InvalidOption)?;
    let name = a.name.clone().unwrap_or(spec.name);
    let device = models::parse_device(&a.device)?;
    let dtype = models::parse_dtype(&a.dtype, &spec.dir, &device)?;
    let model = models::load(&spec.dir, &name, &device, dtype)?;
    let req = LensRequest {
        prompt: a.prompt,
        image,
        options,
    };
    let mut response = run_lens(model.as_ref(), &req)?;
    for _ in 1..a.repeat {
        response = run_lens(model.as_ref(), &req)?;
        eprintln!(
            "{}",
            serde_json::to_string(&response.timing_ms).unwrap_or_default()
        );
    }
    let out = if a.pretty {
        serde_json::to_string_pretty(&response)
    } else {
        serde_json::to_string(&response)
    };
    println!("{}", out.map_err(|e| Error::Internal(e.to_string()))?);
    Ok(())
}

/// `logit-lens probe ... | head` ends as a Unix tool does when its reader goes away: quietly, by
/// SIGPIPE, not with a panic and a backtrace from `println!`. Only for the commands that write
/// their result to stdout and make no connection: an HTTP client's vectored writes (`writev`)
/// raise SIGPIPE on a socket the server closed, which would kill `run --server` without a word,
/// so `run`, `plot` and `serve` keep Rust's default (ignored) and write their stderr with `say!`.
fn stop_quietly_on_a_closed_pipe() {
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to the default, before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> ExitCode {
    logit_lens::keep_freed_memory();
    logit_lens::flush_subnormals();
    let cli = Cli::parse();
    if matches!(cli.command, Command::Probe(_) | Command::Openapi) {
        stop_quietly_on_a_closed_pipe();
    }
    let result = match cli.command {
        Command::Probe(a) => probe(a),
        Command::Serve(a) => {
            return match logit_lens::server::run(a) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Run(a) => match logit_lens::cli::run::run(a) {
            // Some cases failed: they are recorded, the rest is written; 1, not 2.
            Ok(outcome) if outcome.failed > 0 => return ExitCode::from(1),
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        },
        Command::Plot(a) => logit_lens::cli::plot::plot(a),
        Command::Openapi => {
            print!("{}", logit_lens::server::openapi::spec_json());
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error [{}]: {e}", e.code());
            ExitCode::from(2)
        }
    }
}
