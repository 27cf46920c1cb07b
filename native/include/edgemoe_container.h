/* edgemoe C core: reading `.emoe` containers (docs/FORMAT.md, versions 1 and 2) without Python.
 *
 *     char err[512];
 *     emoe_container *c = emoe_container_open("model.emoe", 1, err, sizeof err);   // 1 = verify every CRC-32
 *     if (!c) { fprintf(stderr, "%s\n", err); return 1; }
 *     emoe_model *m = emoe_container_load_model(c, 4096, 0, 4, err, sizeof err);
 *     if (!m) { fprintf(stderr, "%s\n", err); emoe_container_close(c); return 1; }
 *     ... emoe_forward(m, ...) ...
 *     emoe_model_free(m);       // the model borrows pointers into the container's mapping:
 *     emoe_container_close(c);  // free the model first
 *
 * The file is mapped read-only (mmap); tensor data is never copied except 1-D f16 tensors (the core wants 1-D tensors
 * in f32) and tensors whose offset is not aligned to their element size. Errors are returned, never exit()/abort();
 * every message names the file and what was expected. No global state: any number of containers may be open.
 */
#ifndef EDGEMOE_CONTAINER_H
#define EDGEMOE_CONTAINER_H
#include <stddef.h>
#include <stdint.h>

#include "edgemoe.h"

#ifdef __cplusplus
extern "C" {
#endif

#define EMOE_CONTAINER_PREAMBLE_SIZE 4096
#define EMOE_CONTAINER_MAX_VERSION 2 /* versions 1 and 2 are read */
#define EMOE_MAX_DIMS 8

/* Storage types of container tensors: EMOE_F32 / EMOE_F16 / EMOE_Q8_0 (edgemoe.h) plus these two, which the forward
 * pass does not take directly. */
enum {
    EMOE_BYTES = 1000, /* an opaque byte string ("bytes": e.g. tokenizer.json) */
    EMOE_MWQ = 1001,   /* MWQ bit planes (container v2): see emoe_tensor_info.planes */
};
enum { EMOE_KIND_DENSE = 0, EMOE_KIND_EXPERT = 1, EMOE_KIND_BLOB = 2 };

/* One MWQ bit plane: a byte range of the file. bits = base_bits for the base plane P1, 1 for residual planes. */
typedef struct {
    uint64_t offset, nbytes;
    uint32_t crc32;
    int32_t bits;
} emoe_plane;

typedef struct {
    const char *name;  /* NUL-terminated, owned by the container */
    const char *dtype_name; /* "f32", "f16", "q8_0", "bytes", "mwq" */
    int dtype;         /* EMOE_F32 / EMOE_F16 / EMOE_Q8_0 / EMOE_BYTES / EMOE_MWQ */
    int kind;          /* EMOE_KIND_* */
    int ndim;
    int64_t shape[EMOE_MAX_DIMS]; /* logical shape, row-major, [out, in] for matrices */
    uint64_t offset, nbytes; /* absolute file offset and stored length (MWQ: the span of all planes) */
    uint32_t crc32;
    /* MWQ only (n_planes = 0 otherwise): planes P1..PK and the "quant" parameters. */
    int n_planes;
    const emoe_plane *planes;
    int32_t mwq_base_bits, mwq_group_size;
    const char *mwq_nesting; /* "mwq", "msb", ... ("" if absent) */
} emoe_tensor_info;

typedef struct emoe_container emoe_container;

/* Open and check a container: the preamble (magic, version 1..EMOE_CONTAINER_MAX_VERSION, index inside the file), the
 * index checksum, the JSON index (strict parser: no duplicate keys, no NUL in strings, nesting <= 64, integers exact
 * in int64, at most 256 MiB), every tensor entry (known fields, dtype and kind, size consistent with dtype and shape,
 * inside the data region, unique name) and the `arch` object (every field validated, see emoe_model_new_json). With
 * verify != 0 every tensor's (and MWQ plane's) CRC-32 is also checked, which reads the whole file once.
 * Returns NULL on any problem, with a one-line message naming the file in err (if err != NULL). */
emoe_container *emoe_container_open(const char *path, int verify, char *err, size_t errlen);
/* The same, with the kind of failure as a value in *status (EMOE_OK on success):
 *   EMOE_ERR_IO       the file cannot be read (missing, a directory, not a regular file, permission, mmap)
 *   EMOE_ERR_FORMAT   not an edgemoe container (magic), or a container version this reader does not know
 *   EMOE_ERR_CORRUPT  truncated, or a checksum does not match (index, tensor, plane)
 *   EMOE_ERR_INVALID  the index breaks the format (JSON, fields, types, ranges, the arch object)
 *   EMOE_ERR_NOMEM    memory ran out; EMOE_ERR_ARG path is NULL */
emoe_container *emoe_container_open_status(const char *path, int verify, int *status, char *err, size_t errlen);
void emoe_container_close(emoe_container *c);

/* Check every tensor's CRC-32 (as emoe_container_open with verify does). EMOE_OK or EMOE_ERR_CORRUPT with a message
 * (EMOE_ERR_ARG if c is NULL). */
int emoe_container_verify(const emoe_container *c, char *err, size_t errlen);

int emoe_container_version(const emoe_container *c);
const char *emoe_container_path(const emoe_container *c);
uint64_t emoe_container_file_size(const emoe_container *c);

/* Arch fields (the rest of the architecture is the core's private config: src/arch.h emoe_container_config).
 * bos/eos are -1 when null. */
const char *emoe_container_family(const emoe_container *c);
int64_t emoe_container_max_position(const emoe_container *c);
int64_t emoe_container_bos_token_id(const emoe_container *c);
int64_t emoe_container_eos_token_id(const emoe_container *c);
/* metadata[key] if it is a string, else NULL. */
const char *emoe_container_metadata_string(const emoe_container *c, const char *key);

size_t emoe_container_n_tensors(const emoe_container *c);
const emoe_tensor_info *emoe_container_tensor(const emoe_container *c, size_t i); /* file order; NULL if i too big */
const emoe_tensor_info *emoe_container_find(const emoe_container *c, const char *name); /* NULL if absent */
/* Pointer to the tensor's first byte inside the mapping (valid until emoe_container_close). */
const void *emoe_container_data(const emoe_container *c, const emoe_tensor_info *t);
/* Total stored bytes of the tensors of one kind (EMOE_KIND_*). */
uint64_t emoe_container_kind_bytes(const emoe_container *c, int kind);

/* Create a model for the container's config (as emoe_model_new_json would) and register every
 * tensor the tensor table names for it (native/src/tensor_table.c), borrowing pointers into the mapping: f32/f16/
 * q8_0, and expert matrices stored as MWQ bit planes (run at all stored planes; emoe_model_set_precision lowers it).
 * Every tensor is checked first (the same table walk as emoe_container_load_streaming's, native/src/load.c): a
 * required tensor the file lacks is named, and each one's dtype, shape and stored bytes (MWQ: every plane's) must
 * agree with the table. Tensors the table does not name are skipped. Checksums are those emoe_container_open checked
 * (verify). The container must stay open until the model is freed. Returns NULL on failure, with the message in err. */
emoe_model *emoe_container_load_model(emoe_container *c, int max_ctx, int kv_f16, int n_threads, char *err,
                                      size_t errlen);

#ifdef __cplusplus
}
#endif
#endif
