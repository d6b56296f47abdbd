//! `http-hello`: a `wasi:http/proxy` component answering every request with
//! `200 hello from perch\n`, byte for byte the same under Perch and `wasmtime serve`.
//!
//! It is `no_std` on purpose: Rust's `std` on `wasm32-wasip2` reaches `wasi:cli/environment`,
//! `wasi:cli/exit` and the terminal interfaces from its panic machinery, which are not part of
//! the proxy world, so a `std` build would not run under a plain `wasmtime serve`. Without
//! `std` there is no libc either, so this crate brings the three things libc would provide: an
//! allocator, a panic handler and the canonical ABI's `cabi_realloc`.

#![no_std]

extern crate alloc;

use alloc::borrow::ToOwned as _;
use alloc::vec::Vec;
use core::alloc::{GlobalAlloc as _, Layout};

use wasip2::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

const BODY: &[u8] = b"hello from perch\n";
const CONTENT_LENGTH: &[u8] = b"17";
const _: () = assert!(BODY.len() == 17, "CONTENT_LENGTH must match BODY");

#[global_allocator]
static ALLOCATOR: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;

/// A panic aborts the call: the host sees a trap.
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    core::arch::wasm32::unreachable()
}

/// The canonical ABI's allocation hook, used by the host to pass strings and lists (for
/// example an `error-code`) into the component; wasi-libc provides it when `std` is linked.
///
/// # Safety
/// Called by the host per the canonical ABI: `old_ptr`/`old_len`/`align` describe a block this
/// allocator returned earlier (or `old_len == 0`), and `align` is a power of two.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cabi_realloc(
    old_ptr: *mut u8,
    old_len: usize,
    align: usize,
    new_len: usize,
) -> *mut u8 {
    if new_len == 0 {
        // A zero-sized value needs no storage, only a well-aligned non-null pointer.
        return align as *mut u8;
    }
    // SAFETY: the canonical ABI guarantees `align` is a power of two and the sizes fit the
    // address space; `new_len` is non-zero; an old block came from this same allocator.
    let ptr = unsafe {
        if old_len == 0 {
            ALLOCATOR.alloc(Layout::from_size_align_unchecked(new_len, align))
        } else {
            ALLOCATOR.realloc(
                old_ptr,
                Layout::from_size_align_unchecked(old_len, align),
                new_len,
            )
        }
    };
    if ptr.is_null() {
        core::arch::wasm32::unreachable()
    }
    ptr
}

struct HttpHello;

impl wasip2::exports::http::incoming_handler::Guest for HttpHello {
    fn handle(_request: IncomingRequest, response_out: ResponseOutparam) {
        let headers: Vec<_> = Vec::from([
            ("content-type".to_owned(), b"text/plain".to_vec()),
            ("content-length".to_owned(), CONTENT_LENGTH.to_vec()),
        ]);
        let headers = Fields::from_list(&headers).expect("static headers are valid");
        // A new response has status 200.
        let response = OutgoingResponse::new(headers);
        let body = response.body().expect("the body is taken once");
        ResponseOutparam::set(response_out, Ok(response));

        let out = body.write().expect("the stream is taken once");
        // The body is far below the 4096 bytes one blocking write accepts. A failed write means
        // the client went away: there is nobody left to answer, so just stop.
        if out.blocking_write_and_flush(BODY).is_err() {
            return;
        }
        drop(out);
        let _ = OutgoingBody::finish(body, None);
    }
}

wasip2::http::proxy::export!(HttpHello);
