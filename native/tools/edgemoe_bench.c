/* edgemoe-bench: llama-bench-shaped measurements of the C core on an .emoe container, with no Python.
 *
 *   edgemoe-bench MODEL.emoe [-p 512] [-n 128] [-t threads] [-r reps] [--budget 1GB] [--prompt-file ids.txt]
 *                 [--seed 42] [--isa scalar|avx2|avx512vnni|neon|neon_dotprod] [--kv-f16] [--verify] [--print-tokens] [--json]
 *                 [--mode exact|adaptive|ondemand] [--prefetch 0|1|2] [--buffered] [--precision K] [--tg-prompt]
 *
 * Tests (the same as `edgemoe bench` in Python and llama-bench):
 *   ppN  prompt processing: one forward pass over the N prompt tokens from an empty cache, timed; tokens/s = N / time.
 *   tgN  generation: the first prompt token is prefilled (untimed), then N tokens are decoded one at a time, each the
 *        greedy argmax of the previous logits; tokens/s = N / time; every decode step is timed for p50/p95 latency.
 * Each test runs once as a warm-up (llama-bench's: the full prompt for pp, one token for tg), then -r times; mean and
 * sample standard deviation are over those repetitions. With --print-tokens the greedy continuation of the whole
 * prompt (n tokens) is computed once more and printed: the output to compare across machines and builds.
 * The prompt is token ids read from a file or random ids from a fixed seed; the output says which.
 *
 * --budget (or --mode / --stream) runs the model under a memory budget: dense weights resident, experts streamed
 * through the expert cache (emoe_container_load_streaming). The report then has the cache's statistics for the timed
 * repetitions of each test: bytes read (and per token), hit rate, I/O stall fraction, prefetch recall.
 */
#define _POSIX_C_SOURCE 200809L
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#include "edgemoe.h"
#include "edgemoe_container.h"
#include "arch.h" /* emoe_container_config */

typedef struct {
    const char *model;
    int n_prompt, n_gen, n_threads, reps;
    int prompt_given;      /* -p on the command line */
    long long budget;      /* bytes, -1 = none */
    const char *budget_text;
    const char *prompt_file;
    unsigned long long seed;
    int isa; /* EMOE_ISA_AUTO or a forced one */
    int kv_f16, verify, json, print_tokens;
    int stream;       /* streaming engine (--budget, --mode, --stream) */
    int tg_prompt;    /* tg: prefill the whole prompt (untimed) before decoding */
    int tg_text;      /* tg: decode the prompt file's tokens after the prefilled part (teacher forcing), not argmax */
    int32_t *text;    /* the whole prompt file (tg_text) */
    int n_text;
    emoe_stream_options so;
} options;

static void usage(FILE *f) {
    fprintf(f,
            "usage: edgemoe-bench MODEL.emoe [options]\n"
            "  -p, --n-prompt N      prompt tokens for the pp test (default 512; 0 skips it)\n"
            "  -n, --n-gen N         generated tokens for the tg test (default 128; 0 skips it)\n"
            "  -t, --threads N       threads (default 1)\n"
            "  -r, --repetitions N   timed repetitions per test after one warm-up (default 5)\n"
            "  --budget SIZE         memory budget, e.g. 1GB, 512MiB, 800000000: dense weights + KV cache + scratch\n"
            "                        + expert cache; experts are streamed from the file (below the minimum: error)\n"
            "  --mode M              exact (default: output identical to all-resident), adaptive (MWQ: skip refinement\n"
            "                        planes that would stall), ondemand (baseline: LRU, no prefetch, no overlap)\n"
            "  --stream              the streaming engine without a budget (every expert cached after first use)\n"
            "  --prefetch N          0 none, 1 before each layer's attention (default), 2 also the next layer\n"
            "  --prefetch-extra N    predict top-(k+N) experts per token (default 1)\n"
            "  --precision K         MWQ experts: planes to run at (default all stored)\n"
            "  --buffered            read experts through the page cache, pages kept (default: O_DIRECT where the\n"
            "                        file system allows it, else buffered reads whose pages are dropped after use)\n"
            "  --evict P             auto (default), lru, cyclic or freq: force the expert cache's eviction policy\n"
            "  --io-threads N        reader threads (default 2)\n"
            "  --verify-reads W      never, first (default: each piece's first read) or always: CRC-32 of expert reads\n"
            "  --tg-prompt           tg: prefill the whole prompt (untimed) before the timed decode\n"
            "  --tg-text             tg: each decode step feeds the next token of --prompt-file after the -p prefilled\n"
            "                        ones (teacher forcing: routing follows real text instead of a greedy loop)\n"
            "  --prompt-file FILE    prompt token ids (whitespace/comma separated, or a JSON list); default: random\n"
            "                        ids from --seed. With a file, -p defaults to the number of ids in it\n"
            "  --seed N              seed of the random prompt (default 42)\n"
            "  --isa NAME            force the kernels: scalar, avx2, avx512vnni, neon, neon_dotprod (default: best available)\n"
            "  --kv-f16              f16 KV cache (default f32)\n"
            "  --verify              check every tensor's CRC-32 first (reads the whole file: peak RSS then\n"
            "                        includes all of it, so it is off by default; the index CRC is always checked)\n"
            "  --print-tokens        also print the greedy continuation (n tokens) of the prompt, as token ids\n"
            "  --json, -o json       print results as JSON (a list with one object per test, llama-bench fields)\n"
            "  -h, --help            this help\n");
}

/* ---- small utilities ---- */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int parse_int(const char *s, long lo, long hi, int *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) return -1;
    *out = (int)v;
    return 0;
}

/* "512MB" -> 512000000, "1.5GiB", "800000000"; "none"/"unlimited" -> -1 (edgemoe/units.py parse_bytes). */
static int parse_size(const char *s, long long *out) {
    static const struct {
        const char *unit;
        double mult;
    } units[] = {{"", 1},       {"b", 1},         {"k", 1e3},          {"kb", 1e3},     {"m", 1e6},
                 {"mb", 1e6},   {"g", 1e9},       {"gb", 1e9},         {"t", 1e12},     {"tb", 1e12},
                 {"kib", 1024}, {"mib", 1048576}, {"gib", 1073741824}, {"tib", 1099511627776.0}};
    char low[64];
    size_t n = strlen(s);
    if (!n || n >= sizeof low) return -1;
    for (size_t i = 0; i <= n; i++) low[i] = (char)tolower((unsigned char)s[i]);
    if (!strcmp(low, "none") || !strcmp(low, "unlimited") || !strcmp(low, "inf")) return *out = -1, 0;
    size_t i = 0, digits = 0;
    while (low[i] == '.' || isdigit((unsigned char)low[i])) digits += isdigit((unsigned char)low[i]) != 0, i++;
    if (!digits) return -1;
    char num[64];
    memcpy(num, low, i);
    num[i] = '\0';
    char *end;
    double v = strtod(num, &end);
    if (*end) return -1;
    while (low[i] == ' ') i++;
    for (size_t u = 0; u < sizeof units / sizeof units[0]; u++)
        if (!strcmp(low + i, units[u].unit)) {
            double bytes = v * units[u].mult;
            if (!(bytes >= 1) || bytes > 9.2e18) return -1;
            *out = (long long)bytes;
            return 0;
        }
    return -1;
}

static uint64_t splitmix64(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Token ids from a file: integers separated by whitespace, commas, or inside [ ]. *n_out ids, malloc'd. */
static int32_t *read_prompt_file(const char *path, int vocab, int *n_out, char *err, size_t errlen) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        return NULL;
    }
    size_t cap = 256, n = 0;
    int32_t *ids = malloc(cap * sizeof(int32_t));
    long long v = 0;
    int in_num = 0, c;
    long pos = 0;
    while (ids) {
        c = fgetc(f);
        if (c != EOF && isdigit(c)) {
            v = v * 10 + (c - '0');
            if (v > 2147483647LL) {
                snprintf(err, errlen, "%s: byte %ld: token id too large", path, pos);
                goto bad;
            }
            in_num = 1;
        } else if (c == EOF || isspace(c) || c == ',' || c == '[' || c == ']') {
            if (in_num) {
                if (v >= vocab) {
                    snprintf(err, errlen, "%s: token id %lld is outside the vocabulary (0..%d)", path, v, vocab - 1);
                    goto bad;
                }
                if (n == cap) {
                    int32_t *g = realloc(ids, 2 * cap * sizeof(int32_t));
                    if (!g) break;
                    ids = g, cap *= 2;
                }
                ids[n++] = (int32_t)v;
                v = 0, in_num = 0;
            }
            if (c == EOF) break;
        } else {
            snprintf(err, errlen, "%s: byte %ld: unexpected character '%c' (expected token ids separated by spaces "
                     "or commas)", path, pos, isprint(c) ? c : '?');
            goto bad;
        }
        pos++;
    }
    fclose(f);
    if (!ids) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    if (!n) {
        snprintf(err, errlen, "%s: no token ids in the file", path);
        free(ids);
        return NULL;
    }
    *n_out = (int)n;
    return ids;
bad:
    fclose(f);
    free(ids);
    return NULL;
}

/* Peak resident set size: VmHWM from /proc/self/status (Linux, Android), else getrusage. */
static long long peak_rss_bytes(void) {
    FILE *f = fopen("/proc/self/status", "r");
    if (f) {
        char line[256];
        long long kb = -1;
        while (fgets(line, sizeof line, f))
            if (!strncmp(line, "VmHWM:", 6)) {
                kb = atoll(line + 6);
                break;
            }
        fclose(f);
        if (kb >= 0) return kb * 1024;
    }
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru)) return -1;
#ifdef __APPLE__
    return (long long)ru.ru_maxrss; /* bytes on macOS */
#else
    return (long long)ru.ru_maxrss * 1024; /* KiB elsewhere */
#endif
}

/* A one-line description of the CPU: /proc/cpuinfo's "model name" (x86), "Model"/"Hardware" (ARM boards), else "". */
static void cpu_info(char *out, size_t n) {
    out[0] = '\0';
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f) return;
    char line[512];
    static const char *const keys[] = {"model name", "Model", "Hardware", "CPU part"};
    char found[4][200] = {"", "", "", ""};
    while (fgets(line, sizeof line, f)) {
        for (int k = 0; k < 4; k++) {
            size_t kl = strlen(keys[k]);
            if (found[k][0] || strncmp(line, keys[k], kl) || (line[kl] != ' ' && line[kl] != '\t' && line[kl] != ':'))
                continue;
            const char *v = strchr(line, ':');
            if (!v) continue;
            v++;
            while (*v == ' ' || *v == '\t') v++;
            snprintf(found[k], sizeof found[k], "%s", v);
            found[k][strcspn(found[k], "\r\n")] = '\0';
        }
    }
    fclose(f);
    for (int k = 0; k < 4; k++)
        if (found[k][0]) {
            snprintf(out, n, "%s%s", k == 3 ? "CPU part " : "", found[k]);
            return;
        }
}

static int cmp_double(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Percentile with linear interpolation between order statistics (numpy's default), of a sorted array. */
static double percentile(const double *sorted, int n, double q) {
    if (n <= 0) return NAN;
    const double pos = q / 100.0 * (n - 1);
    const int lo = (int)floor(pos), hi = lo + 1 < n ? lo + 1 : lo;
    return sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo);
}

static void mean_sd(const double *v, int n, double *mean, double *sd) {
    double s = 0;
    for (int i = 0; i < n; i++) s += v[i];
    *mean = n ? s / n : 0;
    double ss = 0;
    for (int i = 0; i < n; i++) ss += (v[i] - *mean) * (v[i] - *mean);
    *sd = n > 1 ? sqrt(ss / (n - 1)) : 0; /* sample sd, like Python's statistics.stdev */
}

static int argmax(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i; /* first maximum, like numpy.argmax */
    return best;
}

static void json_string(FILE *f, const char *s) {
    fputc('"', f);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\') fprintf(f, "\\%c", *p);
        else if (*p < 0x20) fprintf(f, "\\u%04x", *p);
        else fputc(*p, f);
    }
    fputc('"', f);
}

static void json_num(FILE *f, double v) {
    if (isfinite(v)) fprintf(f, "%.9g", v);
    else fputs("null", f);
}

static void format_bytes(char *out, size_t n, double b) {
    const char *u[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    int i = 0;
    while (b >= 1024 && i < 4) b /= 1024, i++;
    if (i == 0) snprintf(out, n, "%.0f B", b);
    else snprintf(out, n, "%.2f %s", b, u[i]);
}

/* ---- the measurements ---- */

typedef struct {
    char test[32];
    int n_prompt, n_gen;
    double *samples_ns; /* [reps] */
    double *samples_ts; /* [reps] tokens/s */
    double *token_ms;   /* tg: [reps * n_gen] per-decode latencies, sorted after the run */
    int n_token_ms;
    double avg_ns, sd_ns, avg_ts, sd_ts, p50_ms, p95_ms;
    emoe_stats st; /* streaming: over the timed repetitions */
    double timed_s;
} result;

static void summarize(result *r, int reps) {
    const int n_tok = r->n_prompt ? r->n_prompt : r->n_gen;
    for (int k = 0; k < reps; k++) r->samples_ts[k] = n_tok / (r->samples_ns[k] * 1e-9);
    mean_sd(r->samples_ns, reps, &r->avg_ns, &r->sd_ns);
    mean_sd(r->samples_ts, reps, &r->avg_ts, &r->sd_ts);
    if (r->n_token_ms) qsort(r->token_ms, (size_t)r->n_token_ms, sizeof(double), cmp_double);
    r->p50_ms = r->n_token_ms ? percentile(r->token_ms, r->n_token_ms, 50) : NAN;
    r->p95_ms = r->n_token_ms ? percentile(r->token_ms, r->n_token_ms, 95) : NAN;
}

static int run_forward(emoe_model *m, const int32_t *tok, int n, float *logits, const char *what) {
    int st = emoe_forward(m, tok, n, logits, 0);
    if (st) fprintf(stderr, "edgemoe-bench: %s: %s\n", what, emoe_model_last_error(m));
    return st;
}

static int bench_pp(emoe_model *m, const options *o, const int32_t *prompt, float *logits, result *r) {
    snprintf(r->test, sizeof r->test, "pp%d", o->n_prompt);
    r->n_prompt = o->n_prompt;
    emoe_model_reset(m); /* warm-up */
    if (run_forward(m, prompt, o->n_prompt, logits, "pp warm-up")) return -1;
    emoe_model_reset_stats(m);
    for (int rep = 0; rep < o->reps; rep++) {
        emoe_model_reset(m);
        const double t0 = now_s();
        if (run_forward(m, prompt, o->n_prompt, logits, "pp")) return -1;
        r->samples_ns[rep] = (now_s() - t0) * 1e9;
        r->timed_s += r->samples_ns[rep] * 1e-9;
    }
    emoe_model_stats(m, &r->st);
    return 0;
}

static int bench_tg(emoe_model *m, const options *o, const int32_t *prompt, float *logits, int vocab, result *r) {
    snprintf(r->test, sizeof r->test, "tg%d", o->n_gen);
    r->n_gen = o->n_gen;
    for (int rep = -1; rep < o->reps; rep++) { /* rep -1: the warm-up, one token */
        const int n = rep < 0 ? 1 : o->n_gen;
        emoe_model_reset(m);
        if (run_forward(m, prompt, o->tg_prompt && o->n_prompt > 0 ? o->n_prompt : 1, logits, "tg prefill")) return -1;
        if (rep == 0) emoe_model_reset_stats(m); /* statistics of the timed decode steps only */
        double total = 0;
        for (int i = 0; i < n; i++) {
            const int pos = (o->tg_prompt && o->n_prompt > 0 ? o->n_prompt : 1) + i;
            const int32_t tok = o->tg_text ? o->text[pos % o->n_text] : argmax(logits, vocab);
            const double t0 = now_s();
            if (run_forward(m, &tok, 1, logits, "tg decode")) return -1;
            const double dt = now_s() - t0;
            total += dt;
            if (rep >= 0) r->token_ms[r->n_token_ms++] = dt * 1e3;
        }
        if (rep >= 0) r->samples_ns[rep] = total * 1e9, r->timed_s += total;
    }
    emoe_model_stats(m, &r->st);
    /* the prefills of repetitions 1.. fall inside the statistics: count the decode part only for time, but bytes
     * include the prefill reads; with -r 1 (the budget benchmark) they are exactly the decode steps */
    return 0;
}

/* The greedy continuation of the whole prompt: n_gen ids. */
static int greedy_tokens(emoe_model *m, const options *o, const int32_t *prompt, float *logits, int vocab,
                         int32_t *out) {
    emoe_model_reset(m);
    if (run_forward(m, prompt, o->n_prompt, logits, "greedy prefill")) return -1;
    for (int i = 0; i < o->n_gen; i++) {
        out[i] = argmax(logits, vocab);
        if (i + 1 < o->n_gen && run_forward(m, &out[i], 1, logits, "greedy decode")) return -1;
    }
    return 0;
}

static int parse_args(int argc, char **argv, options *o) {
    *o = (options){.n_prompt = 512, .n_gen = 128, .n_threads = 1, .reps = 5, .budget = -1, .seed = 42,
                   .isa = EMOE_ISA_AUTO};
    emoe_stream_options_init(&o->so);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define NEEDV()                                                                                                       \
    do {                                                                                                              \
        if (!v) {                                                                                                     \
            fprintf(stderr, "edgemoe-bench: %s needs a value\n", a);                                                  \
            return -1;                                                                                                \
        }                                                                                                             \
        i++;                                                                                                          \
    } while (0)
#define INTARG(dst, lo, hi)                                                                                           \
    do {                                                                                                              \
        NEEDV();                                                                                                      \
        if (parse_int(v, lo, hi, &(dst))) {                                                                           \
            fprintf(stderr, "edgemoe-bench: %s %s: expected an integer in %ld..%ld\n", a, v, (long)(lo), (long)(hi)); \
            return -1;                                                                                                \
        }                                                                                                             \
    } while (0)
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            exit(0);
        } else if (!strcmp(a, "-p") || !strcmp(a, "--n-prompt")) {
            INTARG(o->n_prompt, 0, 1 << 20);
            o->prompt_given = 1;
        } else if (!strcmp(a, "-n") || !strcmp(a, "--n-gen")) INTARG(o->n_gen, 0, 1 << 20);
        else if (!strcmp(a, "-t") || !strcmp(a, "--threads")) INTARG(o->n_threads, 1, 1024);
        else if (!strcmp(a, "-r") || !strcmp(a, "--repetitions")) INTARG(o->reps, 1, 100000);
        else if (!strcmp(a, "--seed")) {
            NEEDV();
            char *end;
            errno = 0;
            o->seed = strtoull(v, &end, 10);
            if (errno || end == v || *end) {
                fprintf(stderr, "edgemoe-bench: --seed %s: expected a non-negative integer\n", v);
                return -1;
            }
        } else if (!strcmp(a, "--budget")) {
            NEEDV();
            if (parse_size(v, &o->budget)) {
                fprintf(stderr, "edgemoe-bench: --budget %s: cannot read the size; use e.g. 512MB, 1.5GB or 2GiB\n",
                        v);
                return -1;
            }
            o->budget_text = v;
            o->stream = 1;
        } else if (!strcmp(a, "--mode")) {
            NEEDV();
            o->stream = 1;
            if (!strcmp(v, "exact")) o->so.mode = EMOE_MODE_EXACT;
            else if (!strcmp(v, "adaptive")) o->so.mode = EMOE_MODE_ADAPTIVE;
            else if (!strcmp(v, "ondemand") || !strcmp(v, "lru")) o->so.mode = EMOE_MODE_ONDEMAND;
            else {
                fprintf(stderr, "edgemoe-bench: --mode %s: expected exact, adaptive or ondemand\n", v);
                return -1;
            }
        } else if (!strcmp(a, "--stream")) o->stream = 1;
        else if (!strcmp(a, "--prefetch")) INTARG(o->so.prefetch, 0, 2);
        else if (!strcmp(a, "--prefetch-extra")) INTARG(o->so.prefetch_extra, 0, 64);
        else if (!strcmp(a, "--precision")) INTARG(o->so.precision, 0, 8);
        else if (!strcmp(a, "--io-threads")) INTARG(o->so.io_threads, 1, 16);
        else if (!strcmp(a, "--direct")) o->so.direct = 1; /* the default; kept for old command lines */
        else if (!strcmp(a, "--buffered")) o->so.direct = 0, o->so.drop_cache = 0;
        else if (!strcmp(a, "--evict")) { /* experiments: force the cache's eviction policy */
            NEEDV();
            static const char *const pol[] = {"auto", "lru", "cyclic", "freq"};
            o->so.evict = -1;
            for (int j = 0; j < 4; j++)
                if (!strcmp(v, pol[j])) o->so.evict = j;
            if (o->so.evict < 0) {
                fprintf(stderr, "edgemoe-bench: --evict %s: expected auto, lru, cyclic or freq\n", v);
                return -1;
            }
        }
        else if (!strcmp(a, "--tg-prompt")) o->tg_prompt = 1;
        else if (!strcmp(a, "--tg-text")) o->tg_text = 1;
        else if (!strcmp(a, "--verify-reads")) {
            NEEDV();
            if (!strcmp(v, "never")) o->so.verify = EMOE_VERIFY_READS_NEVER;
            else if (!strcmp(v, "first")) o->so.verify = EMOE_VERIFY_READS_FIRST;
            else if (!strcmp(v, "always")) o->so.verify = EMOE_VERIFY_READS_ALWAYS;
            else {
                fprintf(stderr, "edgemoe-bench: --verify-reads %s: expected never, first or always\n", v);
                return -1;
            }
        } else if (!strcmp(a, "--prompt-file")) {
            NEEDV();
            o->prompt_file = v;
        } else if (!strcmp(a, "--isa")) {
            NEEDV();
            o->isa = -2;
            if (!strcmp(v, "auto")) o->isa = EMOE_ISA_AUTO;
            for (int k = 0; k < EMOE_ISA_COUNT; k++)
                if (emoe_isa_name(k) && !strcmp(v, emoe_isa_name(k))) o->isa = k;
            if (o->isa == -2) {
                fprintf(stderr, "edgemoe-bench: --isa %s: expected auto, scalar, avx2, avx512vnni, neon or neon_dotprod\n", v);
                return -1;
            }
        } else if (!strcmp(a, "--kv-f16")) o->kv_f16 = 1;
        else if (!strcmp(a, "--verify")) o->verify = 1;
        else if (!strcmp(a, "--print-tokens")) o->print_tokens = 1;
        else if (!strcmp(a, "--json")) o->json = 1;
        else if (!strcmp(a, "-o") || !strcmp(a, "--output")) {
            NEEDV();
            if (!strcmp(v, "json")) o->json = 1;
            else if (!strcmp(v, "md")) o->json = 0;
            else {
                fprintf(stderr, "edgemoe-bench: -o %s: expected json or md\n", v);
                return -1;
            }
        } else if (a[0] == '-' && a[1]) {
            fprintf(stderr, "edgemoe-bench: unknown option %s (see --help)\n", a);
            return -1;
        } else if (!o->model) o->model = a;
        else {
            fprintf(stderr, "edgemoe-bench: more than one model given (%s, %s)\n", o->model, a);
            return -1;
        }
#undef INTARG
#undef NEEDV
    }
    if (!o->model) {
        usage(stderr);
        return -1;
    }
    return 0;
}

/* ---- streaming statistics ---- */

static uint64_t sum_levels(const uint64_t *v) {
    uint64_t s = 0;
    for (int i = 0; i < EMOE_STATS_LEVELS; i++) s += v[i];
    return s;
}

static double ratio(double a, double b) { return b > 0 ? a / b : NAN; }

static void print_stream_json(const options *o, const result *r) {
    const emoe_stats *s = &r->st;
    const uint64_t hits = sum_levels(s->hits), misses = sum_levels(s->misses) + sum_levels(s->late);
    const double tokens = (double)(r->n_gen ? (uint64_t)r->n_gen * (uint64_t)o->reps : s->tokens);
    printf(",\n   \"minimum_bytes\": %lld, \"dense_bytes\": %lld, \"kv_bytes\": %lld, \"scratch_bytes\": %lld, "
           "\"cache_capacity_bytes\": %lld, \"cache_peak_bytes\": %lld, \"run_planes\": %d, \"stored_planes\": %d, "
           "\"direct\": %s, \"prefetch\": %d",
           (long long)s->minimum_bytes, (long long)s->dense_bytes, (long long)s->kv_bytes,
           (long long)s->scratch_bytes, (long long)s->cache_capacity_bytes, (long long)s->cache_peak_bytes,
           s->run_planes, s->n_planes, s->direct ? "true" : "false", o->so.mode == EMOE_MODE_ONDEMAND ? 0 : o->so.prefetch);
    printf(",\n   \"bytes_read\": %llu, \"bytes_read_per_token\": ", (unsigned long long)s->bytes_read);
    json_num(stdout, ratio((double)s->bytes_read, tokens));
    printf(", \"demand_bytes\": %llu, \"read_syscalls\": %llu, \"cache_hit_rate\": ",
           (unsigned long long)s->demand_bytes, (unsigned long long)s->read_syscalls);
    json_num(stdout, ratio((double)hits, (double)(hits + misses)));
    printf(", \"hits\": [");
    for (int i = 0; i < s->n_planes && i < EMOE_STATS_LEVELS; i++) printf("%s%llu", i ? ", " : "", (unsigned long long)s->hits[i]);
    printf("], \"misses\": [");
    for (int i = 0; i < s->n_planes && i < EMOE_STATS_LEVELS; i++) printf("%s%llu", i ? ", " : "", (unsigned long long)s->misses[i]);
    printf("], \"late_prefetch\": [");
    for (int i = 0; i < s->n_planes && i < EMOE_STATS_LEVELS; i++) printf("%s%llu", i ? ", " : "", (unsigned long long)s->late[i]);
    printf("], \"experts_at_planes\": [");
    for (int i = 0; i < s->run_planes && i < EMOE_STATS_LEVELS; i++)
        printf("%s%llu", i ? ", " : "", (unsigned long long)s->experts_at_planes[i]);
    printf("],\n   \"stall_s\": ");
    json_num(stdout, s->stall_s);
    printf(", \"stall_fraction\": ");
    json_num(stdout, ratio(s->stall_s, r->timed_s));
    printf(", \"io_busy_s\": ");
    json_num(stdout, s->io_busy_s);
    printf(", \"evictions\": %llu, \"prefetch_issued\": %llu, \"prefetch_used\": %llu, \"prefetch_wasted\": %llu, "
           "\"prefetch_recall\": ", (unsigned long long)s->evictions, (unsigned long long)s->prefetch_issued,
           (unsigned long long)s->prefetch_used, (unsigned long long)s->prefetch_wasted);
    json_num(stdout, ratio((double)s->pred_hits, (double)s->true_experts));
    printf(", \"prefetch_recall_at_k\": ");
    json_num(stdout, ratio((double)s->pred_hits_k, (double)s->true_experts));
    printf(", \"prefetch_precision\": ");
    json_num(stdout, ratio((double)s->pred_hits, (double)s->pred_experts));
    printf(", \"ahead_recall\": ");
    json_num(stdout, ratio((double)s->ahead_hits, (double)s->ahead_experts));
    printf(", \"crc_checked\": %llu", (unsigned long long)s->crc_checked);
}

static void print_stream_text(const options *o, const result *res, int n_res, const char *mode) {
    for (int i = 0; i < n_res; i++) {
        const emoe_stats *s = &res[i].st;
        const uint64_t hits = sum_levels(s->hits), misses = sum_levels(s->misses) + sum_levels(s->late);
        const double tokens = (double)(res[i].n_gen ? (uint64_t)res[i].n_gen * (uint64_t)o->reps : s->tokens);
        if (i == 0)
            printf("streaming (%s, prefetch %d%s): minimum budget %.1f MiB = dense %.1f + KV %.1f + scratch %.1f + "
                   "experts; expert cache %.1f MiB of %.1f MiB on disk\n",
                   mode, o->so.mode == EMOE_MODE_ONDEMAND ? 0 : o->so.prefetch,
                   s->direct ? ", O_DIRECT" : s->drop_cache ? ", buffered, pages dropped after use" : ", buffered",
                   s->minimum_bytes / 1048576.0, s->dense_bytes / 1048576.0, s->kv_bytes / 1048576.0,
                   s->scratch_bytes / 1048576.0, s->cache_capacity_bytes / 1048576.0, s->expert_bytes / 1048576.0);
        if (i == 0 && s->read_note[0]) printf("  reads: %s\n", s->read_note);
        printf("  %s: read %.1f MB/token, hit rate %.1f%%, stall %.0f%% of the time, prefetch recall %.1f%% "
               "(precision %.1f%%), %llu evictions\n",
               res[i].test, ratio((double)s->bytes_read, tokens) / 1e6, 100 * ratio((double)hits, (double)(hits + misses)),
               100 * ratio(s->stall_s, res[i].timed_s), 100 * ratio((double)s->pred_hits, (double)s->true_experts),
               100 * ratio((double)s->pred_hits, (double)s->pred_experts), (unsigned long long)s->evictions);
    }
}

int main(int argc, char **argv) {
    options o;
    if (parse_args(argc, argv, &o)) return 2;
    char err[1024];
    const double t_open = now_s();
    emoe_container *c = emoe_container_open(o.model, o.verify, err, sizeof err);
    if (!c) {
        fprintf(stderr, "edgemoe-bench: %s\n", err);
        return 1;
    }
    const emoe_config *cfg = emoe_container_config(c);
    const int vocab = cfg->vocab;
    const unsigned long long dense_bytes = emoe_container_kind_bytes(c, EMOE_KIND_DENSE);
    const unsigned long long expert_bytes = emoe_container_kind_bytes(c, EMOE_KIND_EXPERT);
    int status = 1;
    emoe_model *m = NULL;
    int32_t *prompt = NULL, *tokens = NULL;
    float *logits = NULL;
    result res[2];
    int n_res = 0;
    memset(res, 0, sizeof res);

    /* the prompt */
    int n_file = 0;
    if (o.prompt_file) {
        prompt = read_prompt_file(o.prompt_file, vocab, &n_file, err, sizeof err);
        if (!prompt) {
            fprintf(stderr, "edgemoe-bench: %s\n", err);
            goto done;
        }
        o.text = prompt, o.n_text = n_file;
        if (!o.prompt_given) o.n_prompt = n_file;
        else if (o.n_prompt > n_file) {
            fprintf(stderr, "edgemoe-bench: -p %d but %s holds only %d token ids\n", o.n_prompt, o.prompt_file, n_file);
            goto done;
        }
    } else {
        prompt = malloc(((size_t)o.n_prompt + 1) * sizeof(int32_t));
        if (!prompt) goto nomem;
        uint64_t st = o.seed;
        for (int i = 0; i < o.n_prompt; i++) prompt[i] = (int32_t)(splitmix64(&st) % (uint64_t)vocab);
        if (o.n_prompt == 0) prompt[0] = (int32_t)(splitmix64(&st) % (uint64_t)vocab); /* tg needs a first token */
    }
    if (o.tg_text && (!o.prompt_file || o.n_text < (o.tg_prompt ? o.n_prompt : 1) + o.n_gen)) {
        fprintf(stderr, "edgemoe-bench: --tg-text needs a --prompt-file with at least %d token ids (the prefilled ones + "
                "-n decoded ones)\n", (o.tg_prompt ? o.n_prompt : 1) + o.n_gen);
        goto done;
    }
    if (o.print_tokens && o.n_prompt == 0 && o.n_gen > 0) {
        fprintf(stderr, "edgemoe-bench: --print-tokens needs a prompt (-p > 0)\n");
        goto done;
    }

    int max_ctx = o.n_prompt + o.n_gen;
    if (max_ctx < o.n_gen + 1) max_ctx = o.n_gen + 1;
    if (max_ctx < 1) max_ctx = 1;
    const long long max_pos = (long long)emoe_container_max_position(c);
    if (max_pos > 0 && max_ctx > max_pos)
        fprintf(stderr, "edgemoe-bench: note: %d positions exceed the model's max_position %lld (RoPE still works; "
                "quality beyond it is not meaningful)\n", max_ctx, max_pos);
    o.so.budget_bytes = o.budget > 0 ? o.budget : 0;
    m = o.stream ? emoe_container_load_streaming(c, max_ctx, o.kv_f16, o.n_threads, &o.so, err, sizeof err)
                 : emoe_container_load_model(c, max_ctx, o.kv_f16, o.n_threads, err, sizeof err);
    if (!m) {
        fprintf(stderr, "edgemoe-bench: %s\n", err);
        goto done;
    }
    const double load_s = now_s() - t_open;
    if (!o.stream && o.so.precision && emoe_model_set_precision(m, o.so.precision)) { /* resident MWQ experts */
        fprintf(stderr, "edgemoe-bench: --precision %d: %s\n", o.so.precision, emoe_model_last_error(m));
        goto done;
    }
    if (o.isa != EMOE_ISA_AUTO && emoe_model_set_isa(m, o.isa)) {
        fprintf(stderr, "edgemoe-bench: %s\n", emoe_model_last_error(m));
        goto done;
    }
    const char *isa = emoe_isa_name(emoe_model_isa(m));
    char isa_list[128] = ""; /* every ISA this CPU + build supports: the CPU features that matter to the kernels */
    for (int k = 0; k < EMOE_ISA_COUNT; k++)
        if (emoe_isa_supported(k) && emoe_isa_name(k)) {
            const size_t used = strlen(isa_list);
            snprintf(isa_list + used, sizeof isa_list - used, "%s%s", used ? " " : "", emoe_isa_name(k));
        }
    logits = malloc((size_t)vocab * sizeof(float));
    tokens = malloc(((size_t)o.n_gen + 1) * sizeof(int32_t));
    if (!logits || !tokens) goto nomem;

    if (o.n_prompt > 0) {
        result *r = &res[n_res++];
        r->samples_ns = calloc((size_t)o.reps, sizeof(double));
        r->samples_ts = calloc((size_t)o.reps, sizeof(double));
        if (!r->samples_ns || !r->samples_ts) goto nomem;
        if (!o.json) fprintf(stderr, "edgemoe-bench: pp%d x %d ...\n", o.n_prompt, o.reps);
        if (bench_pp(m, &o, prompt, logits, r)) goto done;
        summarize(r, o.reps);
    }
    if (o.n_gen > 0) {
        result *r = &res[n_res++];
        r->samples_ns = calloc((size_t)o.reps, sizeof(double));
        r->samples_ts = calloc((size_t)o.reps, sizeof(double));
        r->token_ms = calloc((size_t)o.reps * (size_t)o.n_gen, sizeof(double));
        if (!r->samples_ns || !r->samples_ts || !r->token_ms) goto nomem;
        if (!o.json) fprintf(stderr, "edgemoe-bench: tg%d x %d ...\n", o.n_gen, o.reps);
        if (bench_tg(m, &o, prompt, logits, vocab, r)) goto done;
        summarize(r, o.reps);
    }
    if (o.print_tokens && o.n_prompt > 0 && greedy_tokens(m, &o, prompt, logits, vocab, tokens)) goto done;
    const long long rss = peak_rss_bytes();

    /* ---- report ---- */
    char cpu[256], host[256] = "", prompt_desc[600];
    cpu_info(cpu, sizeof cpu);
    if (gethostname(host, sizeof host - 1)) host[0] = '\0';
    struct utsname un;
    char sys_desc[200] = "";
    if (!uname(&un)) snprintf(sys_desc, sizeof sys_desc, "%s %s %s", un.sysname, un.release, un.machine);
    const char *base = strrchr(o.model, '/') ? strrchr(o.model, '/') + 1 : o.model;
    if (o.prompt_file) snprintf(prompt_desc, sizeof prompt_desc, "%d token ids from %s", o.n_prompt, o.prompt_file);
    else snprintf(prompt_desc, sizeof prompt_desc, "%d random token ids (splitmix64, seed %llu)", o.n_prompt, o.seed);
    static const char *const mode_names[3] = {"exact", "adaptive", "ondemand"};
    const char *mode_name = o.stream ? mode_names[o.so.mode] : "resident";
    const char *budget_note = o.stream ? (o.budget > 0 ? "enforced: dense + KV + scratch + expert cache <= budget"
                                                       : "no budget: the expert cache holds every expert")
                                       : "no budget: the container is mapped and every expert stays resident";

    if (o.json) {
        printf("[\n");
        for (int i = 0; i < n_res; i++) {
            result *r = &res[i];
            printf("  {\"engine\": \"edgemoe\", \"runner\": \"edgemoe-bench\", \"edgemoe_version\": ");
            json_string(stdout, emoe_version());
            printf(", \"model_filename\": ");
            json_string(stdout, o.model);
            printf(", \"model_type\": ");
            json_string(stdout, emoe_container_family(c));
            printf(", \"model_size\": %llu, \"dense_bytes\": %llu, \"expert_bytes\": %llu, \"container_version\": %d",
                   (unsigned long long)emoe_container_file_size(c), dense_bytes, expert_bytes,
                   emoe_container_version(c));
            printf(",\n   \"cpu_info\": ");
            json_string(stdout, cpu);
            printf(", \"system\": ");
            json_string(stdout, sys_desc);
            printf(", \"hostname\": ");
            json_string(stdout, host);
            printf(", \"isa\": ");
            json_string(stdout, isa);
            printf(", \"isa_supported\": [");
            for (const char *p = isa_list; *p;) {
                const size_t len = strcspn(p, " ");
                printf("%s\"%.*s\"", p == isa_list ? "" : ", ", (int)len, p);
                p += len + (p[len] == ' ');
            }
            printf("], \"isa_forced\": %s, \"n_threads\": %d, \"type_k\": \"%s\", \"type_v\": \"%s\"",
                   o.isa == EMOE_ISA_AUTO ? "false" : "true", o.n_threads, o.kv_f16 ? "f16" : "f32",
                   o.kv_f16 ? "f16" : "f32");
            printf(",\n   \"test\": \"%s\", \"n_prompt\": %d, \"n_gen\": %d, \"reps\": %d", r->test, r->n_prompt,
                   r->n_gen, o.reps);
            printf(", \"avg_ns\": ");
            json_num(stdout, r->avg_ns);
            printf(", \"stddev_ns\": ");
            json_num(stdout, r->sd_ns);
            printf(", \"avg_ts\": ");
            json_num(stdout, r->avg_ts);
            printf(", \"stddev_ts\": ");
            json_num(stdout, r->sd_ts);
            printf(",\n   \"samples_ns\": [");
            for (int k = 0; k < o.reps; k++) printf("%s%.0f", k ? ", " : "", r->samples_ns[k]);
            printf("], \"samples_ts\": [");
            for (int k = 0; k < o.reps; k++) {
                printf("%s", k ? ", " : "");
                json_num(stdout, r->samples_ts[k]);
            }
            printf("],\n   \"p50_ms\": ");
            json_num(stdout, r->p50_ms);
            printf(", \"p95_ms\": ");
            json_num(stdout, r->p95_ms);
            printf(", \"peak_rss_bytes\": %lld, \"load_s\": ", rss);
            json_num(stdout, load_s);
            printf(", \"budget_bytes\": ");
            if (o.budget >= 0) printf("%lld", o.budget);
            else printf("null");
            printf(", \"budget_enforced\": %s, \"budget_note\": ", o.stream && o.budget > 0 ? "true" : "false");
            json_string(stdout, budget_note);
            printf(", \"mode\": \"%s\"", mode_name);
            if (o.stream) print_stream_json(&o, r);
            else printf(", \"bytes_read\": null, \"cache_hit_rate\": null");
            printf(", \"crc_verified\": %s", o.verify ? "true" : "false");
            printf(",\n   \"tg_text\": %s, \"tg_prompt\": %s", o.tg_text ? "true" : "false", o.tg_prompt ? "true" : "false");
            printf(", \"prompt_source\": \"%s\", \"prompt_seed\": ", o.prompt_file ? "file" : "random");
            if (o.prompt_file) printf("null");
            else printf("%llu", o.seed);
            printf(", \"prompt_file\": ");
            if (o.prompt_file) json_string(stdout, o.prompt_file);
            else printf("null");
            if (o.print_tokens) {
                printf(",\n   \"prompt_ids\": [");
                for (int k = 0; k < o.n_prompt; k++) printf("%s%d", k ? ", " : "", (int)prompt[k]);
                printf("],\n   \"tokens\": [");
                for (int k = 0; k < o.n_gen; k++) printf("%s%d", k ? ", " : "", (int)tokens[k]);
                printf("]");
            }
            printf("}%s\n", i + 1 < n_res ? "," : "");
        }
        printf("]\n");
    } else {
        char size_s[32], dense_s[32], exp_s[32], rss_s[32];
        format_bytes(size_s, sizeof size_s, (double)emoe_container_file_size(c));
        format_bytes(dense_s, sizeof dense_s, (double)dense_bytes);
        format_bytes(exp_s, sizeof exp_s, (double)expert_bytes);
        format_bytes(rss_s, sizeof rss_s, (double)rss);
        printf("model: %s (%s, container v%d, %d layers, %d experts top-%d; %s: dense %s, experts %s)\n", o.model,
               emoe_container_family(c), emoe_container_version(c), cfg->n_layers, cfg->n_experts, cfg->top_k, size_s,
               dense_s, exp_s);
        const char *isa_how = o.isa != EMOE_ISA_AUTO  ? "forced"
                              : getenv("EDGEMOE_ISA") ? "auto, EDGEMOE_ISA set"
                                                      : "auto";
        printf("cpu: %s%s%s | isa: %s (%s; supported: %s) | threads: %d | kv cache: %s | load %.3f s%s\n",
               cpu[0] ? cpu : "?", sys_desc[0] ? " | " : "", sys_desc, isa, isa_how, isa_list, o.n_threads,
               o.kv_f16 ? "f16" : "f32", load_s, o.verify ? " (CRC verified)" : "");
        printf("prompt: %s\n", prompt_desc);
        if (o.budget >= 0) printf("budget: %lld bytes (%s), %s\n", o.budget, o.budget_text, budget_note);
        if (o.stream) print_stream_text(&o, res, n_res, mode_name);
        printf("\n| model | size | threads | isa | test | t/s | p50 ms | p95 ms |\n");
        printf("|---|---:|---:|---|---|---:|---:|---:|\n");
        for (int i = 0; i < n_res; i++) {
            result *r = &res[i];
            char p50[32] = "", p95[32] = "";
            if (r->n_token_ms) {
                snprintf(p50, sizeof p50, "%.3f", r->p50_ms);
                snprintf(p95, sizeof p95, "%.3f", r->p95_ms);
            }
            printf("| %s | %s | %d | %s | %s | %.2f ± %.2f | %s | %s |\n", base, size_s, o.n_threads, isa, r->test,
                   r->avg_ts, r->sd_ts, p50, p95);
        }
        printf("\npeak RSS: %s (%lld bytes, VmHWM)\n", rss_s, rss);
        if (o.print_tokens) {
            printf("tokens:");
            for (int k = 0; k < o.n_gen; k++) printf(" %d", (int)tokens[k]);
            printf("\n");
        }
    }
    status = 0;
    goto done;
nomem:
    fprintf(stderr, "edgemoe-bench: out of memory\n");
    status = 1;
done:
    for (int i = 0; i < 2; i++) free(res[i].samples_ns), free(res[i].samples_ts), free(res[i].token_ms);
    free(logits);
    free(tokens);
    free(prompt);
    emoe_model_free(m);
    emoe_container_close(c);
    return status;
}
