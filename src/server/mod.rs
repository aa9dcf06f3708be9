//! The HTTP service (`logit-lens serve`): routes, request parsing, limits, errors → status
//! codes, auth and metrics. It never touches a tensor: requests go to the [`crate::engine`]
//! worker, which owns the models.

pub mod auth;
pub mod config;
pub mod connections;
pub mod docs;
pub mod error;
pub mod lens;
pub mod metrics;
pub mod openapi;
pub mod request;
pub mod resolve;
pub mod routes;
pub mod schema;
pub mod viewer;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::middleware::{from_fn_with_state, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;

pub use config::{Limits, ServeArgs};
use error::ApiError;
use metrics::Metrics;

use crate::engine::worker::Loader;
use crate::engine::{Engine, EngineConfig, LoadState, ModelEntry};

pub struct AppState {
    pub engine: Engine,
    pub limits: Limits,
    /// Image pixels requests may still take ([`Limits::max_pending_pixels`]): a request holds
    /// its image's from before decoding until its answer is sent.
    pub pixels: Arc<tokio::sync::Semaphore>,
    /// Empty: no authentication.
    pub api_keys: Vec<String>,
    pub metrics: Arc<Metrics>,
    pub shutting_down: AtomicBool,
}

/// How the engine is set up: queue size and group size.
#[derive(Clone, Copy, Debug)]
pub struct QueueConfig {
    pub max_queue: usize,
    pub max_batch_size: usize,
    pub max_batch_tokens: usize,
    /// Bytes the answers' keys and values may hold together (`--kv-cache-budget`).
    pub kv_cache_budget: usize,
}

impl AppState {
    /// Starts the worker (which loads the models through `loader`) and returns the shared state.
    pub fn start(
        loader: Loader,
        queue: QueueConfig,
        limits: Limits,
        api_keys: Vec<String>,
    ) -> std::io::Result<Arc<AppState>> {
        let metrics = Arc::new(Metrics::default());
        let hook = metrics.clone();
        let engine = Engine::start(
            loader,
            EngineConfig {
                max_queue: queue.max_queue,
                max_batch_size: queue.max_batch_size,
                max_batch_tokens: queue.max_batch_tokens,
                kv_cache_budget: queue.kv_cache_budget,
                on_batch: Some(Arc::new(move |n| hook.batch(n))),
            },
        )?;
        let budget = limits
            .max_pending_pixels
            .min(tokio::sync::Semaphore::MAX_PERMITS as u64) as usize;
        Ok(Arc::new(AppState {
            engine,
            pixels: Arc::new(tokio::sync::Semaphore::new(budget)),
            limits,
            api_keys,
            metrics,
            shutting_down: AtomicBool::new(false),
        }))
    }

    /// Image pixels held now by requests being decoded, queued or run.
    pub fn pending_pixels(&self) -> u64 {
        let budget = self
            .limits
            .max_pending_pixels
            .min(tokio::sync::Semaphore::MAX_PERMITS as u64);
        budget - self.pixels.available_permits() as u64
    }

    /// The loaded models, or 503 while loading or shutting down.
    pub fn ready_models(&self) -> Result<Arc<Vec<ModelEntry>>, ApiError> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(ApiError::not_ready("the service is shutting down"));
        }
        match self.engine.load_state() {
            LoadState::Ready(m) => Ok(m),
            LoadState::Loading => Err(ApiError::not_ready(
                "the models are still loading; retry when GET /ready says ready",
            )),
            LoadState::Failed(e) => Err(ApiError::not_ready(format!(
                "the models failed to load: {e}"
            ))),
        }
    }
}

/// Every route. /lens, /models and /metrics need an API key when keys are configured.
pub fn app(state: Arc<AppState>) -> Router {
    let keyed = Router::new()
        .route("/lens", post(lens::lens))
        .route("/models", get(routes::models))
        .route("/metrics", get(routes::metrics))
        .route_layer(from_fn_with_state(state.clone(), auth::require_key));
    Router::new()
        .merge(keyed)
        .route("/", get(viewer::index))
        .route("/viewer/viewer.js", get(viewer::script))
        .route("/viewer/viewer.css", get(viewer::stylesheet))
        .route("/health", get(routes::health))
        .route("/ready", get(routes::ready))
        .route("/openapi.json", get(docs::openapi_json))
        .route("/docs", get(docs::page))
        .route("/docs/swagger-ui-bundle.js", get(docs::bundle))
        .route("/docs/swagger-ui.css", get(docs::css))
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(DefaultBodyLimit::max(state.limits.max_body_bytes))
        .layer(from_fn_with_state(state.clone(), count_requests))
        .with_state(state)
}

/// Counts every request by route (the matched pattern, so that paths cannot blow up the label
/// set) and status; one whose client went away before its answer (the handler dropped) counts as
/// 499, nginx's "client closed request", and one whose handler panicked as 500. The status is
/// the one the handler returned: a client that leaves mid-upload counts as the 400 its body got,
/// and a connection closed before a request's head arrived is no request.
async fn count_requests(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let mut pending = Uncounted {
        state: &state,
        route: Some(route),
    };
    let response = next.run(req).await;
    if let Some(route) = pending.route.take() {
        state.metrics.request(&route, response.status().as_u16());
    }
    response
}

/// A request not yet counted; dropped so, it counts as 499.
struct Uncounted<'s> {
    state: &'s AppState,
    route: Option<String>,
}

impl Drop for Uncounted<'_> {
    fn drop(&mut self) {
        if let Some(route) = self.route.take() {
            // Dropped by a panic in the handler (hyper then closes the connection): a bug, 500.
            let status = if std::thread::panicking() {
                500
            } else {
                CLIENT_CLOSED_REQUEST
            };
            self.state.metrics.request(&route, status);
        }
    }
}

/// The status a request whose client went away is counted under in `/metrics`.
pub const CLIENT_CLOSED_REQUEST: u16 = 499;

/// Serves until `shutdown` resolves, then stops accepting, lets the requests in flight and the
/// queued jobs finish, and stops the worker.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let flag = state.clone();
    let read_timeout = state.limits.read_timeout;
    connections::serve(listener, app(state.clone()), read_timeout, async move {
        shutdown.await;
        flag.shutting_down.store(true, Ordering::SeqCst);
    })
    .await?;
    state.engine.shutdown().await;
    Ok(())
}

/// ctrl-c or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// `logit-lens serve`.
pub fn run(args: ServeArgs) -> Result<(), String> {
    crate::models::dtype_choice(&args.dtype).map_err(|e| e.to_string())?;
    let specs = if args.models.is_empty() {
        let demo = resolve::demo()?;
        eprintln!(
            "no --model given: serving the demo model `{}` from {} (a tiny Qwen2-VL with RANDOM \
             weights: the numbers are real, the words are not)",
            demo.name,
            demo.dir.display()
        );
        vec![demo]
    } else {
        args.models
            .iter()
            .map(|m| resolve::resolve(m))
            .collect::<Result<Vec<_>, _>>()?
    };
    for (i, s) in specs.iter().enumerate() {
        if specs[..i].iter().any(|o| o.name == s.name) {
            return Err(format!(
                "two models are named `{}`; use NAME=DIR to tell them apart",
                s.name
            ));
        }
    }
    let keys = args.keys()?;
    let dtype_spec = args.dtype.clone();
    // The device is opened on the worker thread that will use it (a CUDA context belongs to a thread).
    let device_spec = args.device.clone();
    let warm_up = args.warm_up;
    let loader: Loader = Box::new(move || {
        let device = crate::models::parse_device(&device_spec)?;
        if device.is_cuda() {
            eprintln!(
                "fused half-precision kernels (LOGIT_LENS_FUSED): {}",
                crate::models::fused::describe()
            );
        } else {
            eprintln!(
                "f32 GEMMs with weights (LOGIT_LENS_AMX): {}",
                crate::models::amx::describe()
            );
        }
        specs
            .iter()
            .map(|s| {
                let dtype = crate::models::parse_dtype(&dtype_spec, &s.dir, &device)?;
                eprintln!(
                    "loading `{}` from {} ({dtype:?} on {device:?})",
                    s.name,
                    s.dir.display()
                );
                let model = crate::models::load(&s.dir, &s.name, &device, dtype)?;
                if warm_up {
                    let ms = crate::engine::warm_up(model.as_ref()).map_err(|e| {
                        crate::Error::Internal(format!(
                            "warm-up request to `{}` failed: {e}",
                            s.name
                        ))
                    })?;
                    eprintln!("warmed up `{}` in {ms:.0} ms", s.name);
                }
                Ok(model)
            })
            .collect()
    });
    let queue = QueueConfig {
        max_queue: args.max_queue,
        max_batch_size: args.max_batch_size,
        max_batch_tokens: args.max_batch_tokens,
        kv_cache_budget: args.kv_cache_budget,
    };
    let runtime = tokio::runtime::Runtime::new().map_err(|e| format!("cannot start tokio: {e}"))?;
    runtime.block_on(async move {
        let state = AppState::start(loader, queue, args.limits(), keys.clone())
            .map_err(|e| format!("cannot start the worker thread: {e}"))?;
        let addr = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        eprintln!(
            "listening on http://{addr} (docs at /docs{})",
            if keys.is_empty() {
                ""
            } else {
                "; API keys required"
            }
        );
        let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<String>();
        let watcher = state.clone();
        tokio::spawn(async move {
            match watcher.engine.wait_loaded().await {
                Ok(models) => eprintln!("ready: {} model(s) loaded", models.len()),
                Err(e) => {
                    let _ = failed_tx.send(e);
                }
            }
        });
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<Option<String>>();
        let stop = async move {
            let why = tokio::select! {
                _ = shutdown_signal() => None,
                Ok(e) = failed_rx => Some(e),
            };
            eprintln!("shutting down: finishing the requests in flight");
            let _ = stop_tx.send(why);
        };
        serve(listener, state, stop)
            .await
            .map_err(|e| format!("the server failed: {e}"))?;
        match stop_rx.await {
            Ok(Some(e)) => Err(format!("the models failed to load: {e}")),
            _ => Ok(()),
        }
    })
}
