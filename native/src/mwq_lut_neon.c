/* NEON table-lookup MWQ plane kernels (mwq_lut.h): not written yet. */
#include "mwq_lut.h"
typedef int emoe_mwq_lut_neon_unused; /* ISO C forbids an empty translation unit */
