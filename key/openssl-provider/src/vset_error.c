/* Forwards one message to OpenSSL's core_vset_error upcall (OSSL_FUNC_CORE_VSET_ERROR).
 * The upcall takes a va_list; building one needs a variadic C function. No OpenSSL header is
 * included: the upcall's type is declared from its documented signature. */
#include <stdarg.h>
#include <stdint.h>

typedef void (*keyd_core_vset_error_fn)(const void *handle, uint32_t reason, const char *format,
                                        va_list arguments);

static void keyd_call_vset_error(keyd_core_vset_error_fn upcall, const void *handle,
                                 uint32_t reason, const char *format, ...) {
    va_list arguments;
    va_start(arguments, format);
    upcall(handle, reason, format, arguments);
    va_end(arguments);
}

void keyd_provider_vset_error(keyd_core_vset_error_fn upcall, const void *handle, uint32_t reason,
                              const char *message) {
    keyd_call_vset_error(upcall, handle, reason, "%s", message);
}
