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
    default: return "unknown error";
    }
}
