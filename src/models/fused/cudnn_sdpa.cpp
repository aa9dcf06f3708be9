// Attention through cuDNN 9's fused SDPA (scaled dot-product attention), for the `cudnn` feature:
// a small C ABI over the header-only cuDNN frontend (PyPI's nvidia-cudnn-frontend wheel), built by
// build.rs with the host compiler. cuDNN itself is dlopened at run time (libcudnn.so.9, as torch's
// wheels install it): nothing links against it, and the binary stays small.
//
// One problem shape: q `[b, hq, sq, d]`, k and v `[b, hkv, skv, d]` (grouped-query attention when
// hkv < hq), each read in place through element strides (batch, head, token; the head dim
// contiguous), bf16 or f16, causal (top-left) or not, softmax(q·kᵀ·scale)·v in f32 inside, the
// output `[b, sq, hq, d]` contiguous. A graph is built once per shape and kept (the least recently
// used go past MAX_PLANS); with dynamic shapes (cuDNN >= 9.4), the graphs of one topology (dtype,
// heads, head dim, mask, scale) share one compiled kernel through cuDNN's kernel cache, so a new
// sequence length or image size costs a plan, not a compilation.

#include <cudnn_frontend.h>
#include <dlfcn.h>

#include <array>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

namespace cudnn_frontend {
// NV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING: the frontend resolves every cuDNN call through this.
void *cudnn_dlhandle = nullptr;
}  // namespace cudnn_frontend

namespace fe = cudnn_frontend;

namespace {

struct Shape {
    int dtype;  // 0: bf16, 1: f16
    int64_t b, hq, hkv, sq, skv, d;
    std::array<int64_t, 9> strides;  // q, k, v: batch, head, token
    int causal;
    float scale;
    int dynamic;  // built with dynamic shapes (the topology's kernel cache) if cuDNN takes it

    bool operator<(Shape const &o) const {
        auto key = [](Shape const &s) {
            return std::make_tuple(
                s.dtype, s.b, s.hq, s.hkv, s.sq, s.skv, s.d, s.strides, s.causal, s.scale, s.dynamic);
        };
        return key(*this) < key(o);
    }
};

// What a graph is apart from its sizes: graphs of one topology share compiled kernels (cuDNN's
// kernel cache, for graphs built with dynamic shapes), so a new sequence length or batch builds a
// plan without compiling its kernel again.
struct Topology {
    int dtype;
    int64_t hq, hkv, d;
    int causal;
    float scale;

    explicit Topology(Shape const &p) : dtype(p.dtype), hq(p.hq), hkv(p.hkv), d(p.d), causal(p.causal), scale(p.scale) {}

    bool operator<(Topology const &o) const {
        return std::make_tuple(dtype, hq, hkv, d, causal, scale) <
               std::make_tuple(o.dtype, o.hq, o.hkv, o.d, o.causal, o.scale);
    }
};

struct Kernels {
    bool dynamic = true;                      // until a dynamic-shape build fails for this topology
    std::shared_ptr<fe::KernelCache> cache;   // shared by the topology's dynamic-shape graphs
    std::string why;                          // why it went static
};

struct Plan {
    std::shared_ptr<fe::graph::Graph> graph;
    uint64_t used;  // the state's clock at the last use: the least recently used plan goes first
};

// Plans kept at most: every distinct shape (a sequence length, an image size, a batch) builds one,
// and a long-running server sees many; each holds an execution plan (and, built statically, its
// compiled kernel).
constexpr size_t MAX_PLANS = 256;

enum Uid : int64_t { Q = 1, K = 2, V = 3, O = 4 };

struct State {
    std::mutex lock;
    cudnnHandle_t handle = nullptr;
    std::map<Shape, Plan> plans;
    std::map<Topology, Kernels> kernels;
    uint64_t clock = 0;
    uint64_t evicted = 0;
};

State &state() {
    static State *s = new State();  // never destroyed: graphs may outlive static teardown order
    return *s;
}

void set_error(char *err, size_t len, std::string const &msg) {
    if (err && len) {
        std::snprintf(err, len, "%s", msg.c_str());
    }
}

// Dynamic shapes and the kernel cache (cuDNN >= 9.4), unless LOGIT_LENS_CUDNN_DYNAMIC=0 (or
// logit_lens_cudnn_sdpa_set_dynamic(0), for the GPU test's comparison): a graph per shape either
// way; with them, a new shape of a known topology compiles nothing.
std::atomic<int> dynamic_override{-1};

bool dynamic_wanted() {
    static bool const from_env = [] {
        char const *v = std::getenv("LOGIT_LENS_CUDNN_DYNAMIC");
        return !(v && std::strcmp(v, "0") == 0);
    }();
    int o = dynamic_override.load();
    return o < 0 ? from_env : o != 0;
}

// Opens libcudnn.so.9 and a handle, once. The caller holds the lock.
bool ready(State &s, char *err, size_t len) {
    if (s.handle) {
        return true;
    }
    if (!fe::cudnn_dlhandle) {
        fe::cudnn_dlhandle = dlopen("libcudnn.so.9", RTLD_NOW | RTLD_GLOBAL);
        if (!fe::cudnn_dlhandle) {
            fe::cudnn_dlhandle = dlopen("libcudnn.so", RTLD_NOW | RTLD_GLOBAL);
        }
        if (!fe::cudnn_dlhandle) {
            const char *why = dlerror();
            set_error(err, len,
                      std::string("cannot load libcudnn.so.9 (put the nvidia-cudnn wheel's lib/ on "
                                  "LD_LIBRARY_PATH): ") +
                          (why ? why : "not found"));
            return false;
        }
    }
    auto status = fe::detail::create_handle(&s.handle);
    if (status != CUDNN_STATUS_SUCCESS) {
        s.handle = nullptr;
        set_error(err, len, "cudnnCreate failed: status " + std::to_string(static_cast<int>(status)));
        return false;
    }
    return true;
}

// The graph and plan for one shape; with `cache`, a dynamic-shape graph whose kernel the cache
// holds (compiled by the topology's first graph, reused by the rest). `implementation`: the
// frontend's SDPA op (AUTO picks UNIFIED for a static non-causal graph where it qualifies, and
// COMPOSITE otherwise, dynamic shapes included). nullptr and `msg` on failure, thrown or returned.
std::shared_ptr<fe::graph::Graph> make_graph(State &s,
                                             Shape const &p,
                                             std::shared_ptr<fe::KernelCache> const &cache,
                                             fe::AttentionImplementation_t implementation,
                                             std::string &msg) try {
    auto io = p.dtype == 0 ? fe::DataType_t::BFLOAT16 : fe::DataType_t::HALF;
    auto graph = std::make_shared<fe::graph::Graph>();
    graph->set_io_data_type(io)
        .set_intermediate_data_type(fe::DataType_t::FLOAT)
        .set_compute_data_type(fe::DataType_t::FLOAT);
    if (cache) {
        graph->set_dynamic_shape_enabled(true).set_kernel_cache(cache);
    }
    auto operand = [&](char const *name, Uid uid, int64_t heads, int64_t tokens, int at) {
        return graph->tensor(fe::graph::Tensor_attributes()
                                 .set_name(name)
                                 .set_uid(uid)
                                 .set_dim({p.b, heads, tokens, p.d})
                                 .set_stride({p.strides[at], p.strides[at + 1], p.strides[at + 2], 1}));
    };
    auto q = operand("Q", Q, p.hq, p.sq, 0);
    auto k = operand("K", K, p.hkv, p.skv, 3);
    auto v = operand("V", V, p.hkv, p.skv, 6);
    auto options = fe::graph::SDPA_attributes()
                       .set_name("sdpa")
                       .set_generate_stats(false)
                       .set_causal_mask(p.causal != 0)
                       .set_attn_scale(p.scale)
                       .set_implementation(implementation);
    auto outputs = graph->sdpa(q, k, v, options);
    // [b, sq, hq, d] in memory: what the output projection reads.
    outputs[0]
        ->set_output(true)
        .set_uid(O)
        .set_dim({p.b, p.hq, p.sq, p.d})
        .set_stride({p.sq * p.hq * p.d, p.d, p.hq * p.d, 1});
    auto good = [&](fe::error_t e, char const *step) {
        if (e.is_good()) {
            return true;
        }
        msg = std::string(step) + ": " + e.get_message();
        return false;
    };
    if (!good(graph->validate(), "validate") || !good(graph->build_operation_graph(s.handle), "operation graph") ||
        !good(graph->create_execution_plans({fe::HeurMode_t::A, fe::HeurMode_t::FALLBACK}), "execution plans") ||
        !good(graph->check_support(s.handle), "support") || !good(graph->build_plans(), "plans")) {
        return nullptr;
    }
    return graph;
} catch (std::exception const &e) {
    // The frontend throws where a cuDNN or CUDA symbol is missing, or no SDPA implementation fits.
    msg = std::string("build: ") + e.what();
    return nullptr;
}

// The shape's graph: kept, or built (dynamic shapes with the topology's kernel cache first; if
// cuDNN refuses that for the topology, statically from then on), evicting the least recently used
// plan past MAX_PLANS. The caller holds the lock.
std::shared_ptr<fe::graph::Graph> build(State &s, Shape const &p, char *err, size_t len) {
    s.clock += 1;
    auto it = s.plans.find(p);
    if (it != s.plans.end()) {
        it->second.used = s.clock;
        return it->second.graph;
    }
    auto &kernels = s.kernels[Topology(p)];
    std::shared_ptr<fe::graph::Graph> graph;
    std::string msg;
    if (kernels.dynamic && p.dynamic) {
        if (!kernels.cache) {
            kernels.cache = std::make_shared<fe::KernelCache>();
        }
        graph = make_graph(s, p, kernels.cache, fe::AttentionImplementation_t::AUTO, msg);
        if (!graph) {
            kernels.dynamic = false;
            kernels.cache.reset();
            kernels.why = msg;
        }
    }
    if (!graph) {
        graph = make_graph(s, p, nullptr, fe::AttentionImplementation_t::AUTO, msg);
    }
    if (!graph) {
        // AUTO may have picked UNIFIED (static, non-causal), whose engines are not the dynamic
        // graphs' COMPOSITE ones: try those before giving up.
        std::string composite;
        graph = make_graph(s, p, nullptr, fe::AttentionImplementation_t::COMPOSITE, composite);
        if (!graph) {
            msg += "; COMPOSITE: " + composite;
        }
    }
    if (!graph) {
        set_error(err, len, "cuDNN SDPA " + msg);
        return nullptr;
    }
    if (s.plans.size() >= MAX_PLANS) {
        // The plan about to go may still run on the stream (a static plan owns its compiled
        // kernel): let the device finish first. Rare (MAX_PLANS distinct shapes).
        (void)fe::detail::cuda_device_synchronize();
        auto oldest = s.plans.begin();
        for (auto i = s.plans.begin(); i != s.plans.end(); ++i) {
            if (i->second.used < oldest->second.used) {
                oldest = i;
            }
        }
        s.plans.erase(oldest);
        s.evicted += 1;
    }
    s.plans.emplace(p, Plan{graph, s.clock});
    return graph;
}

Shape shape(int dtype,
            int64_t const *dims,
            int64_t const *strides,
            int causal,
            float scale) {
    Shape p{};
    p.dtype  = dtype;
    p.b      = dims[0];
    p.hq     = dims[1];
    p.hkv    = dims[2];
    p.sq     = dims[3];
    p.skv    = dims[4];
    p.d      = dims[5];
    std::memcpy(p.strides.data(), strides, sizeof(int64_t) * 9);
    p.causal  = causal;
    p.scale   = scale;
    p.dynamic = dynamic_wanted() ? 1 : 0;
    return p;
}

// Under the lock, with cuDNN loaded: `use(state, graph)` with the shape's graph (built if new);
// its result, or -1 with `err` set where loading, building or `use` fails.
template <typename F>
int64_t with_graph(int dtype,
                   int64_t const *dims,
                   int64_t const *strides,
                   int causal,
                   float scale,
                   char *err,
                   size_t err_len,
                   F use) {
    auto &s = state();
    std::lock_guard<std::mutex> guard(s.lock);
    try {
        if (!ready(s, err, err_len)) {
            return -1;
        }
        auto graph = build(s, shape(dtype, dims, strides, causal, scale), err, err_len);
        if (!graph) {
            return -1;
        }
        return use(s, *graph);
    } catch (std::exception const &e) {
        set_error(err, err_len, std::string("cuDNN SDPA: ") + e.what());
        return -1;
    } catch (...) {
        set_error(err, err_len, "cuDNN SDPA: an unknown exception");
        return -1;
    }
}

}  // namespace

extern "C" {

// The workspace (bytes) the shape's plan needs, building the plan if new; -1 on error (`err`).
// dims: b, hq, hkv, sq, skv, d; strides: q, k, v (batch, head, token) in elements.
int64_t logit_lens_cudnn_sdpa_workspace(int dtype,
                                        int64_t const *dims,
                                        int64_t const *strides,
                                        int causal,
                                        float scale,
                                        char *err,
                                        size_t err_len) {
    return with_graph(dtype, dims, strides, causal, scale, err, err_len, [&](State &, fe::graph::Graph &graph) {
        int64_t bytes = 0;
        auto e = graph.get_workspace_size(bytes);
        if (!e.is_good()) {
            set_error(err, err_len, "cuDNN SDPA workspace: " + e.get_message());
            return int64_t{-1};
        }
        return bytes;
    });
}

// Runs the shape's plan on `stream` (a cudaStream_t) with `workspace` (`workspace_bytes` long;
// null when the plan needs none). 0 on success, -1 on error (`err`).
int logit_lens_cudnn_sdpa_run(int dtype,
                              int64_t const *dims,
                              int64_t const *strides,
                              int causal,
                              float scale,
                              void *stream,
                              void const *q,
                              void const *k,
                              void const *v,
                              void *o,
                              void *workspace,
                              int64_t workspace_bytes,
                              char *err,
                              size_t err_len) {
    auto rc = with_graph(dtype, dims, strides, causal, scale, err, err_len, [&](State &s, fe::graph::Graph &graph) {
        // The plan run here is looked up again (and could have been rebuilt since the caller
        // asked for its workspace): never let it write past the workspace it was given.
        int64_t need = 0;
        auto w = graph.get_workspace_size(need);
        if (!w.is_good() || need > workspace_bytes || (need > 0 && !workspace)) {
            set_error(err, err_len,
                      "cuDNN SDPA: the plan needs " + std::to_string(need) + " bytes of workspace, " +
                          std::to_string(workspace_bytes) + " given");
            return int64_t{-1};
        }
        if (fe::detail::set_stream(s.handle, static_cast<cudaStream_t>(stream)) != CUDNN_STATUS_SUCCESS) {
            set_error(err, err_len, "cudnnSetStream failed");
            return int64_t{-1};
        }
        std::unordered_map<int64_t, void *> pack = {
            {Q, const_cast<void *>(q)}, {K, const_cast<void *>(k)}, {V, const_cast<void *>(v)}, {O, o}};
        auto e = graph.execute(s.handle, pack, workspace);
        if (!e.is_good()) {
            set_error(err, err_len, "cuDNN SDPA execute: " + e.get_message());
            return int64_t{-1};
        }
        return int64_t{0};
    });
    return static_cast<int>(rc);
}

// What is cached, for logs and the GPU test: plans kept and evicted, and per topology whether its
// graphs have dynamic shapes (one compiled kernel) or are static (with cuDNN's reason). Writes at
// most `len` bytes (NUL included) into `out`.
void logit_lens_cudnn_sdpa_describe(char *out, size_t len) try {
    auto &s = state();
    std::lock_guard<std::mutex> guard(s.lock);
    std::string text = std::to_string(s.plans.size()) + " plans kept (at most " + std::to_string(MAX_PLANS) +
                       "), " + std::to_string(s.evicted) + " evicted";
    for (auto const &[t, k] : s.kernels) {
        text += "; d " + std::to_string(t.d) + (t.dtype == 0 ? " bf16" : " f16") + " heads " + std::to_string(t.hq) +
                "/" + std::to_string(t.hkv) + (t.causal ? " causal" : "") + ": ";
        if (!k.cache && k.why.empty()) {
            text += "static (dynamic shapes off)";
        } else if (k.dynamic) {
            text += "dynamic shapes, one kernel";
        } else {
            text += "static (dynamic refused: " + k.why + ")";
        }
    }
    set_error(out, len, text);
} catch (...) {
    set_error(out, len, "(cannot describe the cuDNN plans)");
}

// 1: new shapes are built with dynamic shapes (the default unless LOGIT_LENS_CUDNN_DYNAMIC=0),
// 0: statically. Plans already built keep theirs (the mode is part of a plan's key).
void logit_lens_cudnn_sdpa_set_dynamic(int on) {
    dynamic_override.store(on ? 1 : 0);
}

}  // extern "C"
