// Greedy decoding over libllama's C API: prints the prompt's token ids, then one line per generated
// token (id, its logit, and its lead over the runner-up). Built for x86-64 and, cross-compiled, for
// aarch64 by bench/arm64_check.sh, which compares the two outputs on the same GGUF file.
//
//   greedy MODEL.gguf "prompt" N_TOKENS
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "llama.h"

static void quiet(enum ggml_log_level level, const char * text, void * user_data) {
    (void) text; (void) user_data;
    if (level == GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

int main(int argc, char ** argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s MODEL.gguf PROMPT N_TOKENS\n", argv[0]);
        return 2;
    }
    const char * prompt = argv[2];
    const int n_gen = atoi(argv[3]);
    llama_log_set(quiet, NULL);
    llama_backend_init();

    struct llama_model_params mparams = llama_model_default_params();
    struct llama_model * model = llama_model_load_from_file(argv[1], mparams);
    if (!model) { fprintf(stderr, "cannot load %s\n", argv[1]); return 1; }
    const struct llama_vocab * vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);

    llama_token tokens[512];
    const int n_prompt = llama_tokenize(vocab, prompt, (int32_t) strlen(prompt), tokens, 512, false, true);
    if (n_prompt <= 0) { fprintf(stderr, "cannot tokenize the prompt\n"); return 1; }

    struct llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx = n_prompt + n_gen + 8;
    cparams.n_batch = cparams.n_ctx;
    cparams.n_threads = cparams.n_threads_batch = 2;
    struct llama_context * ctx = llama_init_from_model(model, cparams);
    if (!ctx) { fprintf(stderr, "cannot create a context\n"); return 1; }

    printf("prompt");
    for (int i = 0; i < n_prompt; i++) printf(" %d", tokens[i]);
    printf("\n");

    struct llama_batch batch = llama_batch_get_one(tokens, n_prompt);  // a multi-token prompt batch first
    llama_token next = 0;
    for (int step = 0; step < n_gen; step++) {
        if (llama_decode(ctx, batch) != 0) { fprintf(stderr, "llama_decode failed\n"); return 1; }
        const float * logits = llama_get_logits_ith(ctx, -1);
        next = 0;
        for (int v = 1; v < n_vocab; v++) if (logits[v] > logits[next]) next = v;
        float second = -1e30f;  // the runner-up's logit: how close a tie the choice was
        for (int v = 0; v < n_vocab; v++) if (v != next && logits[v] > second) second = logits[v];
        printf("%d %.6f %.6f\n", next, logits[next], logits[next] - second);
        batch = llama_batch_get_one(&next, 1);
    }
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
