/* One loader: the tensor table walked over a container, checked once, for both storage policies (resident: load.c,
 * emoe_container_load_model; under a memory budget: stream_load.c, emoe_container_load_streaming). */
#ifndef EDGEMOE_LOAD_H
#define EDGEMOE_LOAD_H
#include <stddef.h>

#include "edgemoe_container.h"
#include "tensor_table.h"

typedef struct {
    tt_item it;                /* the table's tensor: name, shape, role */
    const emoe_tensor_info *t; /* the file's entry; NULL when the file lacks it (never for a required tensor) */
} load_item;

/* Every tensor model m reads, matched with container c's entries and checked: a required tensor the file lacks is
 * named; each present one has a dtype the core runs for its role (f32/f16/q8_0; MWQ planes for expert matrices),
 * the table's shape (1-D or [rows, cols]), and stored bytes equal to shape x dtype (MWQ: every plane's bytes, its
 * base bits and group). Tensors of the file the table does not name are not part of the plan. *items (malloc'd,
 * the caller frees it) gets *n items in table order. EMOE_OK, or a status with the message (naming the file) in err. */
int load_plan(const emoe_container *c, const emoe_model *m, load_item **items, size_t *n, char *err, size_t errlen);

#endif
