//! Reading and writing `OSSL_PARAM` arrays, and the static parameter lists the `*_gettable_*`
//! and `*_settable_*` functions return.
//!
//! Integers travel in native byte order (`OSSL_PARAM_INTEGER`, `OSSL_PARAM_UNSIGNED_INTEGER`,
//! any width); big numbers (`n`, `e`) are unsigned integers of any length, native order too.

use std::ffi::{c_char, c_uint, c_void, CStr};

use crate::ffi::{
    OsslParam, PARAM_INTEGER, PARAM_OCTET_STRING, PARAM_UNSIGNED_INTEGER, PARAM_UTF8_PTR,
    PARAM_UTF8_STRING,
};

/// A parameter list the core may read from any thread: its pointers are to static strings.
#[derive(Debug)]
pub struct ParamList(pub Vec<OsslParam>);

// SAFETY: the entries only point to 'static C strings and null data; nothing mutates them.
unsafe impl Sync for ParamList {}
// SAFETY: as above.
unsafe impl Send for ParamList {}

impl ParamList {
    /// A descriptor list of `(name, type)` entries, ended by the null entry.
    pub fn new(entries: &[(&'static CStr, c_uint)]) -> ParamList {
        let mut list: Vec<OsslParam> = entries
            .iter()
            .map(|(key, data_type)| OsslParam {
                key: key.as_ptr(),
                data_type: *data_type,
                data: std::ptr::null_mut(),
                data_size: 0,
                return_size: 0,
            })
            .collect();
        list.push(end());
        ParamList(list)
    }

    /// The pointer handed to the core.
    pub fn as_ptr(&self) -> *const OsslParam {
        self.0.as_ptr()
    }
}

/// The entry that ends a list.
pub fn end() -> OsslParam {
    OsslParam {
        key: std::ptr::null(),
        data_type: 0,
        data: std::ptr::null_mut(),
        data_size: 0,
        return_size: 0,
    }
}

/// The entries of a core-owned array, up to the null key.
///
/// # Safety
/// `params` is null or points to an array ended by an entry whose key is null, valid and not
/// otherwise borrowed for `'a`.
pub unsafe fn entries<'a>(params: *mut OsslParam) -> Vec<&'a mut OsslParam> {
    let mut found = Vec::new();
    if params.is_null() {
        return found;
    }
    let mut index = 0;
    loop {
        // SAFETY: the caller guarantees the array is ended by a null key, so every index up to
        // and including that entry is in bounds.
        let entry = unsafe { &mut *params.add(index) };
        if entry.key.is_null() {
            return found;
        }
        found.push(entry);
        index += 1;
    }
}

/// The entry's name.
pub fn name(param: &OsslParam) -> &[u8] {
    // SAFETY: keys of a live array are NUL-terminated C strings (checked non-null by `entries`).
    unsafe { CStr::from_ptr(param.key) }.to_bytes()
}

/// Writes an integer into a requested entry of either integer type and any width.
pub fn set_integer(param: &mut OsslParam, value: i64) -> bool {
    let size = param.data_size;
    let ok = match param.data_type {
        PARAM_INTEGER | PARAM_UNSIGNED_INTEGER => {
            if param.data_type == PARAM_UNSIGNED_INTEGER && value < 0 {
                return false;
            }
            match size {
                4 => i32::try_from(value).is_ok(),
                8 => true,
                _ => false,
            }
        }
        _ => false,
    };
    if !ok {
        return false;
    }
    param.return_size = size;
    if param.data.is_null() {
        return true;
    }
    // SAFETY: the core owns a buffer of `data_size` bytes at `data`; 4 or 8 bytes are written,
    // unaligned-safe.
    unsafe {
        if size == 4 {
            std::ptr::write_unaligned(param.data.cast::<i32>(), value as i32);
        } else {
            std::ptr::write_unaligned(param.data.cast::<i64>(), value);
        }
    }
    true
}

/// Reads an integer of either integer type and width 4 or 8.
pub fn get_integer(param: &OsslParam) -> Option<i64> {
    if param.data.is_null() {
        return None;
    }
    // SAFETY: the entry's buffer holds `data_size` readable bytes.
    unsafe {
        match (param.data_type, param.data_size) {
            (PARAM_INTEGER, 4) => Some(i64::from(std::ptr::read_unaligned(
                param.data.cast::<i32>(),
            ))),
            (PARAM_INTEGER, 8) => Some(std::ptr::read_unaligned(param.data.cast::<i64>())),
            (PARAM_UNSIGNED_INTEGER, 4) => Some(i64::from(std::ptr::read_unaligned(
                param.data.cast::<u32>(),
            ))),
            (PARAM_UNSIGNED_INTEGER, 8) => {
                i64::try_from(std::ptr::read_unaligned(param.data.cast::<u64>())).ok()
            }
            _ => None,
        }
    }
}

/// Writes a string into a requested UTF-8 entry (NUL-terminated when it fits).
pub fn set_utf8(param: &mut OsslParam, value: &str) -> bool {
    match param.data_type {
        PARAM_UTF8_STRING => {
            param.return_size = value.len();
            if param.data.is_null() {
                return true;
            }
            if param.data_size < value.len() {
                return false;
            }
            // SAFETY: the buffer has `data_size` >= len bytes; a NUL is added when room remains.
            unsafe {
                std::ptr::copy_nonoverlapping(value.as_ptr(), param.data.cast::<u8>(), value.len());
                if param.data_size > value.len() {
                    *param.data.cast::<u8>().add(value.len()) = 0;
                }
            }
            true
        }
        _ => false,
    }
}

/// Reads a UTF-8 string entry (string or pointer form).
pub fn get_utf8(param: &OsslParam) -> Option<String> {
    if param.data.is_null() {
        return None;
    }
    let bytes: &[u8] = match param.data_type {
        // SAFETY: a string entry holds `data_size` bytes (possibly NUL-terminated earlier).
        PARAM_UTF8_STRING => unsafe {
            std::slice::from_raw_parts(param.data.cast::<u8>(), param.data_size)
        },
        PARAM_UTF8_PTR => {
            // SAFETY: a pointer entry holds a `const char *` to a NUL-terminated string.
            let pointer = unsafe { *param.data.cast::<*const c_char>() };
            if pointer.is_null() {
                return None;
            }
            // SAFETY: as above.
            unsafe { CStr::from_ptr(pointer) }.to_bytes()
        }
        _ => return None,
    };
    let bytes = match bytes.iter().position(|byte| *byte == 0) {
        Some(nul) => &bytes[..nul],
        None => bytes,
    };
    String::from_utf8(bytes.to_vec()).ok()
}

/// Writes bytes into a requested octet-string entry.
pub fn set_octets(param: &mut OsslParam, value: &[u8]) -> bool {
    if param.data_type != PARAM_OCTET_STRING {
        return false;
    }
    param.return_size = value.len();
    if param.data.is_null() {
        return true;
    }
    if param.data_size < value.len() {
        return false;
    }
    // SAFETY: the buffer has at least `value.len()` bytes.
    unsafe { std::ptr::copy_nonoverlapping(value.as_ptr(), param.data.cast::<u8>(), value.len()) };
    true
}

/// Reads an octet-string entry.
pub fn get_octets(param: &OsslParam) -> Option<Vec<u8>> {
    if param.data_type != PARAM_OCTET_STRING || param.data.is_null() {
        return None;
    }
    // SAFETY: the entry's buffer holds `data_size` readable bytes.
    Some(unsafe { std::slice::from_raw_parts(param.data.cast::<u8>(), param.data_size) }.to_vec())
}

/// Reads an unsigned big number (native byte order) as big-endian bytes without leading zeros.
pub fn get_big_number(param: &OsslParam) -> Option<Vec<u8>> {
    if param.data_type != PARAM_UNSIGNED_INTEGER || param.data.is_null() {
        return None;
    }
    // SAFETY: the entry's buffer holds `data_size` readable bytes.
    let native = unsafe { std::slice::from_raw_parts(param.data.cast::<u8>(), param.data_size) };
    let mut big_endian = native.to_vec();
    if cfg!(target_endian = "little") {
        big_endian.reverse();
    }
    Some(strip_leading_zeros(&big_endian).to_vec())
}

/// `bytes` without leading zero bytes (at least one byte).
pub fn strip_leading_zeros(bytes: &[u8]) -> &[u8] {
    let first = bytes
        .iter()
        .position(|byte| *byte != 0)
        .unwrap_or(bytes.len().saturating_sub(1));
    &bytes[first..]
}

/// Owned values behind an outgoing parameter array (for export callbacks and upcalls).
#[derive(Debug, Default)]
pub struct OutgoingParams {
    buffers: Vec<Vec<u8>>,
    keys: Vec<&'static CStr>,
    types: Vec<c_uint>,
}

impl OutgoingParams {
    /// Adds a UTF-8 string (NUL-terminated buffer, size without the NUL).
    pub fn utf8(&mut self, key: &'static CStr, value: &str) {
        let mut buffer = value.as_bytes().to_vec();
        buffer.push(0);
        self.push(key, PARAM_UTF8_STRING, buffer);
    }

    /// Adds an octet string.
    pub fn octets(&mut self, key: &'static CStr, value: &[u8]) {
        self.push(key, PARAM_OCTET_STRING, value.to_vec());
    }

    /// Adds a C `int`.
    pub fn int(&mut self, key: &'static CStr, value: i32) {
        self.push(key, PARAM_INTEGER, value.to_ne_bytes().to_vec());
    }

    /// Adds an unsigned big number given big-endian.
    pub fn big_number(&mut self, key: &'static CStr, big_endian: &[u8]) {
        let mut native = big_endian.to_vec();
        if cfg!(target_endian = "little") {
            native.reverse();
        }
        self.push(key, PARAM_UNSIGNED_INTEGER, native);
    }

    fn push(&mut self, key: &'static CStr, data_type: c_uint, buffer: Vec<u8>) {
        self.keys.push(key);
        self.types.push(data_type);
        self.buffers.push(buffer);
    }

    /// The array (valid while `self` lives and is not changed).
    pub fn array(&mut self) -> Vec<OsslParam> {
        let mut array: Vec<OsslParam> = self
            .buffers
            .iter_mut()
            .zip(self.keys.iter().zip(&self.types))
            .map(|(buffer, (key, data_type))| {
                let data_size = if *data_type == PARAM_UTF8_STRING {
                    buffer.len() - 1
                } else {
                    buffer.len()
                };
                OsslParam {
                    key: key.as_ptr(),
                    data_type: *data_type,
                    data: buffer.as_mut_ptr().cast::<c_void>(),
                    data_size,
                    return_size: usize::MAX,
                }
            })
            .collect();
        array.push(end());
        array
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_round_trip_in_both_widths() {
        for width in [4usize, 8] {
            let mut buffer = [0u8; 8];
            let mut param = OsslParam {
                key: c"bits".as_ptr(),
                data_type: PARAM_INTEGER,
                data: buffer.as_mut_ptr().cast(),
                data_size: width,
                return_size: 0,
            };
            assert!(set_integer(&mut param, 2048));
            assert_eq!(param.return_size, width);
            assert_eq!(get_integer(&param), Some(2048));
        }
    }

    #[test]
    fn strings_need_room() {
        let mut buffer = [0xffu8; 4];
        let mut param = OsslParam {
            key: c"group".as_ptr(),
            data_type: PARAM_UTF8_STRING,
            data: buffer.as_mut_ptr().cast(),
            data_size: 4,
            return_size: 0,
        };
        assert!(!set_utf8(&mut param, "prime256v1"));
        assert!(set_utf8(&mut param, "abc"));
        assert_eq!(&buffer, b"abc\0");
    }

    #[test]
    fn big_numbers_are_native_order() {
        let mut outgoing = OutgoingParams::default();
        outgoing.big_number(c"n", &[0x01, 0x02, 0x03]);
        let array = outgoing.array();
        assert_eq!(get_big_number(&array[0]), Some(vec![0x01, 0x02, 0x03]));
        assert_eq!(strip_leading_zeros(&[0, 0, 5]), &[5]);
        assert_eq!(strip_leading_zeros(&[0]), &[0]);
    }
}
