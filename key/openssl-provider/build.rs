//! Compiles the one C function the provider needs: forwarding a message to the core's
//! `core_vset_error` upcall, whose `va_list` argument only C can construct portably.

fn main() {
    println!("cargo:rerun-if-changed=src/vset_error.c");
    cc::Build::new()
        .file("src/vset_error.c")
        .warnings(true)
        .compile("keyd_provider_vset_error");
}
