/* Fuzz target for the container reader: any bytes -> emoe_container_open (every CRC checked), and when it opens, the
 * resident model (emoe_container_load_model) and the streaming one under a small memory budget
 * (emoe_container_load_streaming), each running one emoe_forward of two tokens. A refusal anywhere is a correct
 * answer; what the fuzzer looks for is a crash, a sanitizer report, a hang or a leak.
 *
 * Two ways to build it (native/fuzz/build.sh):
 *   - with -fsanitize=fuzzer (clang): libFuzzer calls LLVMFuzzerTestOneInput with mutated inputs;
 *   - without it (gcc or clang): a main() that replays files and directories (a corpus), one input at a time:
 *       fuzz_container [-v] FILE_OR_DIR...
 *     It prints "== NAME" on stderr before each input (a sanitizer report then names the input that caused it)
 *     and a summary on stdout; exit status 0 when every input was handled without a crash.
 *
 * Inputs are written to a memfd and opened through /proc/self/fd/N, so nothing is written to disk.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "edgemoe.h"
#include "arch.h" /* emoe_container_config: the vocab the forward needs (the fuzz target builds with the sources) */
#include "edgemoe_container.h"

enum { MAX_CTX = 16, N_THREADS = 1 };

/* What happened to one input (counted by the replay driver). */
typedef struct {
    long inputs, refused_open, refused_resident, ran_resident, refused_stream, ran_stream;
} fuzz_counts;

static int g_verbose;

static int forward_two(emoe_model *m, int vocab) {
    if (vocab < 1) return -1;
    float *logits = malloc((size_t)vocab * sizeof(float));
    if (!logits) return -1;
    int32_t toks[2] = {1 % vocab, 2 % vocab};
    int rc = emoe_forward(m, toks, 2, logits, 0);
    free(logits);
    return rc;
}

/* The streaming model under a budget of the dense part + half the experts + room for KV cache and scratch: small
 * enough that the expert cache evicts, large enough that a valid container loads. */
static int64_t small_budget(const emoe_container *c) {
    uint64_t dense = emoe_container_kind_bytes(c, EMOE_KIND_DENSE);
    uint64_t experts = emoe_container_kind_bytes(c, EMOE_KIND_EXPERT);
    uint64_t b = dense + experts / 2 + (4u << 20);
    return b > (uint64_t)INT64_MAX ? INT64_MAX : (int64_t)b;
}

static void run_path(const char *path, const char *name, fuzz_counts *n) {
    char err[1024] = "";
    n->inputs++;
    emoe_container *c = emoe_container_open(path, 1, err, sizeof err);
    if (!c) {
        n->refused_open++;
        if (g_verbose) printf("%s: refused at open: %s\n", name, err);
        return;
    }
    const emoe_config *cfg = emoe_container_config(c);
    int vocab = cfg ? cfg->vocab : 0;
    emoe_model *m = emoe_container_load_model(c, MAX_CTX, 0, N_THREADS, err, sizeof err);
    if (m) {
        int rc = forward_two(m, vocab);
        if (rc == EMOE_OK) n->ran_resident++;
        else n->refused_resident++;
        if (g_verbose) printf("%s: resident: %s\n", name, rc == EMOE_OK ? "ran" : emoe_model_last_error(m));
        emoe_model_free(m);
    } else {
        n->refused_resident++;
        if (g_verbose) printf("%s: resident refused: %s\n", name, err);
    }
    emoe_stream_options opt;
    emoe_stream_options_init(&opt);
    opt.budget_bytes = small_budget(c);
    opt.io_threads = 1;
    opt.verify = EMOE_VERIFY_READS_ALWAYS;
    m = emoe_container_load_streaming(c, MAX_CTX, 0, N_THREADS, &opt, err, sizeof err);
    if (m) {
        int rc = forward_two(m, vocab);
        if (rc == EMOE_OK) n->ran_stream++;
        else n->refused_stream++;
        if (g_verbose) printf("%s: streaming: %s\n", name, rc == EMOE_OK ? "ran" : emoe_model_last_error(m));
        emoe_model_free(m);
    } else {
        n->refused_stream++;
        if (g_verbose) printf("%s: streaming refused: %s\n", name, err);
    }
    emoe_container_close(c);
}

/* One input held in a memfd (created once, rewritten for each input). */
static int g_memfd = -1;

static int run_bytes(const uint8_t *data, size_t size, const char *name, fuzz_counts *n) {
    if (g_memfd < 0) {
        g_memfd = memfd_create("emoe_fuzz", 0);
        if (g_memfd < 0) {
            perror("memfd_create");
            return -1;
        }
    }
    if (ftruncate(g_memfd, 0) != 0) return -1;
    size_t done = 0;
    while (done < size) {
        ssize_t w = pwrite(g_memfd, data + done, size - done, (off_t)done);
        if (w <= 0) return -1;
        done += (size_t)w;
    }
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", g_memfd);
    run_path(path, name, n);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static fuzz_counts n;
    run_bytes(data, size, "input", &n);
    return 0;
}

#ifdef EDGEMOE_LIBFUZZER
/* libFuzzer's own byte mutations nearly always break the index CRC-32, and a 700 KB input is mostly tensor data: this
 * mutator mutates the JSON index alone half the time (it sits at the end of the file; the preamble's length follows
 * it) and then repairs the index checksum (7 times in 8), so the JSON reader and the semantic checks get the inputs. */
size_t LLVMFuzzerMutate(uint8_t *data, size_t size, size_t max_size);
size_t LLVMFuzzerCustomMutator(uint8_t *data, size_t size, size_t max_size, unsigned int seed);

static uint64_t get_u64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}
static void put_le(uint8_t *p, uint64_t v, int n) {
    for (int i = 0; i < n; i++) p[i] = (uint8_t)(v >> (8 * i));
}

size_t LLVMFuzzerCustomMutator(uint8_t *data, size_t size, size_t max_size, unsigned int seed) {
    enum { PRE = 28 };
    if (size >= PRE && (seed & 1) == 0) {
        uint64_t off = get_u64(data + 8), nb = get_u64(data + 16);
        if (off >= PRE && off < size && nb == size - off && off < max_size) {
            size_t n = LLVMFuzzerMutate(data + off, size - off, max_size - off);
            size = off + n;
            put_le(data + 16, n, 8);
        } else {
            size = LLVMFuzzerMutate(data, size, max_size);
        }
    } else {
        size = LLVMFuzzerMutate(data, size, max_size);
    }
    if (size >= PRE && (seed >> 1) % 8 != 0) {
        uint64_t off = get_u64(data + 8), nb = get_u64(data + 16);
        if (off <= size && nb <= size - off) put_le(data + 24, emoe_crc32(0, data + off, (size_t)nb), 4);
    }
    return size;
}
#else
static int replay_file(const char *path, fuzz_counts *n) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "%s: %s\n", path, strerror(errno));
        return -1;
    }
    uint8_t *buf = NULL;
    size_t len = 0, cap = 0;
    for (;;) {
        if (cap - len < 65536) {
            size_t ncap = cap ? cap * 2 : 1 << 20;
            uint8_t *nb = realloc(buf, ncap);
            if (!nb) {
                free(buf);
                fclose(f);
                return -1;
            }
            buf = nb;
            cap = ncap;
        }
        size_t r = fread(buf + len, 1, cap - len, f);
        len += r;
        if (r == 0) break;
    }
    fclose(f);
    fprintf(stderr, "== %s\n", path);
    int rc = run_bytes(buf, len, path, n);
    free(buf);
    return rc;
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* Every regular file of a directory (not recursive), in name order. */
static int replay_dir(const char *dir, fuzz_counts *n) {
    DIR *d = opendir(dir);
    if (!d) return -1;
    char **names = NULL;
    size_t count = 0, cap = 0;
    int status = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.' || strcmp(e->d_name, "manifest.json") == 0) continue;
        if (count == cap) {
            cap = cap ? cap * 2 : 256;
            char **nn = realloc(names, cap * sizeof *names);
            if (!nn) {
                status = -1;
                break;
            }
            names = nn;
        }
        size_t len = strlen(dir) + strlen(e->d_name) + 2;
        names[count] = malloc(len);
        if (!names[count]) {
            status = -1;
            break;
        }
        snprintf(names[count++], len, "%s/%s", dir, e->d_name);
    }
    closedir(d);
    qsort(names, count, sizeof *names, cmp_str);
    for (size_t i = 0; i < count; i++) {
        struct stat st;
        if (status == 0 && stat(names[i], &st) == 0 && S_ISREG(st.st_mode) && replay_file(names[i], n) != 0)
            status = -1;
        free(names[i]);
    }
    free(names);
    return status;
}

int main(int argc, char **argv) {
    fuzz_counts n = {0};
    int status = 0, files = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "-v") == 0) {
            g_verbose = 1;
            continue;
        }
        struct stat st;
        if (stat(argv[i], &st) != 0) {
            fprintf(stderr, "%s: %s\n", argv[i], strerror(errno));
            status = 2;
            continue;
        }
        files++;
        if ((S_ISDIR(st.st_mode) ? replay_dir(argv[i], &n) : replay_file(argv[i], &n)) != 0) status = 2;
    }
    if (!files) {
        fprintf(stderr, "usage: %s [-v] FILE_OR_DIR...\n", argv[0]);
        return 2;
    }
    if (g_memfd >= 0) close(g_memfd);
    printf("%ld inputs: %ld refused at open; resident: %ld ran, %ld refused; streaming: %ld ran, %ld refused\n",
           n.inputs, n.refused_open, n.ran_resident, n.refused_resident, n.ran_stream, n.refused_stream);
    return status;
}
#endif
