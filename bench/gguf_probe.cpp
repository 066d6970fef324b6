// A small program against libllama (llama.cpp's C API) that bench/check_gguf_llama_cpp.py builds
// and runs to read a GGUF file the way llama.cpp's tools do: its tokenizer, its forward pass (every
// position's logits, flash attention off, a float32 KV cache), and its greedy sampler.
//
//   gguf_probe MODEL.gguf tokenize TEXT_FILE OUT.i32      llama_tokenize(add_special, no special parsing)
//   gguf_probe MODEL.gguf logits IDS.i32 N_CTX OUT.f32     the ids in windows of N_CTX, each from an empty
//                                                          cache: float32 logits [n_ids, n_vocab]
//   gguf_probe MODEL.gguf greedy PROMPTS.txt N OUT.txt     per line of space-separated ids: N greedy ids
//
// PROBE_NO_REPACK=1 turns weight repacking off (llama.cpp's -nr; on AMX CPUs its Q8_0 repacking
// crashes, an upstream defect).

#include <llama.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

std::vector<char> read_bytes(const std::string & path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) throw std::runtime_error("cannot read " + path);
    return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

template <typename T> void write_array(const std::string & path, const std::vector<T> & v) {
    std::ofstream f(path, std::ios::binary);
    f.write(reinterpret_cast<const char *>(v.data()), std::streamsize(v.size() * sizeof(T)));
    if (!f) throw std::runtime_error("cannot write " + path);
}

struct Model {
    llama_model * model = nullptr;
    llama_context * ctx = nullptr;
    const llama_vocab * vocab = nullptr;

    Model(const std::string & path, uint32_t n_ctx) {
        llama_model_params mp = llama_model_default_params();
        const char * no_repack = std::getenv("PROBE_NO_REPACK");
        mp.use_extra_bufts = !(no_repack && std::string(no_repack) == "1");
        mp.progress_callback = [](float, void *) { return true; };  // no progress dots
        model = llama_model_load_from_file(path.c_str(), mp);
        if (!model) throw std::runtime_error("llama.cpp could not load " + path);
        vocab = llama_model_get_vocab(model);
        if (n_ctx) {
            llama_context_params cp = llama_context_default_params();
            cp.n_ctx = cp.n_batch = cp.n_ubatch = n_ctx;
            cp.n_threads = cp.n_threads_batch = int32_t(std::thread::hardware_concurrency());
            cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
            cp.type_k = cp.type_v = GGML_TYPE_F32;  // llama.cpp's default f16 cache rounds k and v
            ctx = llama_init_from_model(model, cp);
            if (!ctx) throw std::runtime_error("llama.cpp could not make a context");
        }
    }
    ~Model() {
        if (ctx) llama_free(ctx);
        llama_model_free(model);
    }

    // Decode ids at positions start.. (every position's logits if all_logits, else the last's).
    void decode(const std::vector<llama_token> & ids, int start, bool all_logits) {
        llama_batch batch = llama_batch_init(int32_t(ids.size()), 0, 1);
        batch.n_tokens = int32_t(ids.size());
        for (size_t i = 0; i < ids.size(); ++i) {
            batch.token[i] = ids[i];
            batch.pos[i] = start + int(i);
            batch.n_seq_id[i] = 1;
            batch.seq_id[i][0] = 0;
            batch.logits[i] = all_logits || i + 1 == ids.size();
        }
        const int32_t rc = llama_decode(ctx, batch);
        llama_batch_free(batch);
        if (rc != 0) throw std::runtime_error("llama_decode failed: " + std::to_string(rc));
    }
};

void tokenize(const std::string & model_path, const std::string & text_path, const std::string & out) {
    Model m(model_path, 0);
    const std::vector<char> text = read_bytes(text_path);
    std::vector<llama_token> ids(text.size() + 8);
    const int32_t n = llama_tokenize(m.vocab, text.data(), int32_t(text.size()), ids.data(), int32_t(ids.size()),
                                     /*add_special*/ true, /*parse_special*/ false);
    if (n < 0) throw std::runtime_error("llama_tokenize failed");
    ids.resize(size_t(n));
    write_array(out, ids);
}

void logits(const std::string & model_path, const std::string & ids_path, int n_ctx, const std::string & out) {
    Model m(model_path, uint32_t(n_ctx));
    const std::vector<char> raw = read_bytes(ids_path);
    const std::vector<llama_token> ids(reinterpret_cast<const llama_token *>(raw.data()),
                                       reinterpret_cast<const llama_token *>(raw.data() + raw.size()));
    const int n_vocab = llama_vocab_n_tokens(m.vocab);
    std::vector<float> all;
    all.reserve(ids.size() * size_t(n_vocab));
    for (size_t start = 0; start < ids.size(); start += size_t(n_ctx)) {
        const std::vector<llama_token> window(ids.begin() + long(start),
                                              ids.begin() + long(std::min(ids.size(), start + size_t(n_ctx))));
        llama_memory_clear(llama_get_memory(m.ctx), true);
        m.decode(window, 0, true);
        for (size_t i = 0; i < window.size(); ++i) {
            const float * row = llama_get_logits_ith(m.ctx, int32_t(i));
            all.insert(all.end(), row, row + n_vocab);
        }
    }
    write_array(out, all);
}

void greedy(const std::string & model_path, const std::string & prompts_path, int n_new, const std::string & out) {
    std::ifstream in(prompts_path);
    std::vector<std::vector<llama_token>> prompts;
    size_t longest = 0;
    for (std::string line; std::getline(in, line);) {
        std::istringstream words(line);
        prompts.emplace_back(std::istream_iterator<llama_token>(words), std::istream_iterator<llama_token>());
        longest = std::max(longest, prompts.back().size());
    }
    Model m(model_path, uint32_t(longest + size_t(n_new)));
    llama_sampler * sampler = llama_sampler_chain_init(llama_sampler_chain_default_params());
    llama_sampler_chain_add(sampler, llama_sampler_init_greedy());
    std::ofstream f(out);
    for (const auto & prompt : prompts) {
        llama_memory_clear(llama_get_memory(m.ctx), true);
        llama_sampler_reset(sampler);
        m.decode(prompt, 0, false);
        for (int k = 0; k < n_new; ++k) {
            const llama_token next = llama_sampler_sample(sampler, m.ctx, -1);
            f << (k ? " " : "") << next;
            m.decode({next}, int(prompt.size()) + k, false);
        }
        f << "\n";
    }
    llama_sampler_free(sampler);
}

}  // namespace

int main(int argc, char ** argv) {
    const std::vector<std::string> a(argv, argv + argc);
    llama_log_set([](ggml_log_level level, const char * text, void *) {
        if (level >= GGML_LOG_LEVEL_WARN) std::fputs(text, stderr);
    }, nullptr);
    llama_backend_init();
    try {
        if (a.size() == 5 && a[2] == "tokenize") {
            tokenize(a[1], a[3], a[4]);
        } else if (a.size() == 6 && a[2] == "logits") {
            logits(a[1], a[3], std::stoi(a[4]), a[5]);
        } else if (a.size() == 6 && a[2] == "greedy") {
            greedy(a[1], a[3], std::stoi(a[4]), a[5]);
        } else {
            std::fputs("usage: gguf_probe MODEL.gguf (tokenize TEXT OUT | logits IDS N_CTX OUT | greedy PROMPTS N OUT)\n",
                       stderr);
            return 2;
        }
    } catch (const std::exception & e) {
        std::fprintf(stderr, "gguf_probe: %s\n", e.what());
        return 1;
    }
    llama_backend_free();
    return 0;
}
