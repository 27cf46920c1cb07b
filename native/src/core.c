/* Library identity and status strings. */
#include "edgemoe.h"

const char *emoe_version(void) { return "0.1.0"; }

const char *emoe_status_string(int status) {
    switch (status) {
    case EMOE_OK: return "ok";
    case EMOE_ERR_ARG: return "invalid argument";
    case EMOE_ERR_NOMEM: return "out of memory";
    case EMOE_ERR_NOT_READY: return "model not ready (a required tensor is missing)";
    case EMOE_ERR_CTX: return "context full (KV cache has max_ctx positions)";
    case EMOE_ERR_ISA: return "instruction set not supported on this CPU";
    case EMOE_ERR_THREAD: return "thread creation failed";
    case EMOE_ERR_IO: return "reading expert weights failed (I/O error, file truncated or replaced)";
    case EMOE_ERR_CORRUPT: return "expert weights failed their CRC-32 (the file is damaged)";
    case EMOE_ERR_BUDGET: return "memory budget below the minimum this model and context need";
    case EMOE_ERR_FORMAT: return "not an edgemoe container, or a container version this edgemoe does not read";
    case EMOE_ERR_INVALID: return "invalid container index or architecture description";
    default: return "unknown error";
    }
}
