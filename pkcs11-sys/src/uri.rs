//! RFC 7512 `pkcs11:` URIs: the subset keyd needs to pick a token and an object.
//!
//! Path attributes are `;`-separated, query attributes `&`-separated after `?`; values are
//! percent-decoded. Understood: `slot-id` (decimal), `token` (label), `object` (label), `id`
//! (raw bytes), `pin-value`, and `pin-source` (`file:/path`, `file:///path` or `/path`), so a PIN
//! need not sit in a configuration file. Every other attribute is ignored.

use std::path::PathBuf;

use cryptoki::types::AuthPin;

/// Where the user PIN comes from.
pub enum PinSource {
    /// `pin-value=...`: the PIN itself.
    Value(AuthPin),
    /// `pin-source=file:/path`: the first line of a file, read when the token is opened.
    File(PathBuf),
}

impl std::fmt::Debug for PinSource {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PinSource::Value(_) => formatter.write_str("PinSource::Value(<redacted>)"),
            PinSource::File(path) => write!(formatter, "PinSource::File({})", path.display()),
        }
    }
}

impl PinSource {
    /// The PIN: the value, or the first line of the file (trailing `\r`/`\n` removed).
    ///
    /// A file readable by group or others is used but warned about (its path is logged, never
    /// its content).
    pub fn resolve(&self) -> Result<AuthPin, UriError> {
        match self {
            PinSource::Value(pin) => {
                use secrecy::ExposeSecret as _;
                Ok(AuthPin::from(pin.expose_secret().to_owned()))
            }
            PinSource::File(path) => {
                use std::os::unix::fs::MetadataExt as _;
                let read_error = |source| UriError::PinFile {
                    path: path.clone(),
                    source,
                };
                let metadata = std::fs::metadata(path).map_err(read_error)?;
                if metadata.mode() & 0o077 != 0 {
                    log::warn!(
                        "PIN file {} is accessible to group or others; it should be mode 0600",
                        path.display()
                    );
                }
                let mut text = std::fs::read_to_string(path).map_err(read_error)?;
                let line_end = text.find(['\r', '\n']).unwrap_or(text.len());
                text.truncate(line_end);
                Ok(AuthPin::from(text))
            }
        }
    }
}

/// A parsed `pkcs11:` URI (only the attributes keyd uses).
#[derive(Debug, Default)]
pub struct Pkcs11Uri {
    /// `slot-id`: the slot's numeric ID; wins over `token`.
    pub slot_id: Option<u64>,
    /// `token`: the token label.
    pub token: Option<String>,
    /// `object`: the object label (`CKA_LABEL`).
    pub object: Option<String>,
    /// `id`: the object ID (`CKA_ID`), raw bytes.
    pub id: Option<Vec<u8>>,
    /// `pin-value` or `pin-source`.
    pub pin: Option<PinSource>,
}

/// Why a URI was refused, or its PIN could not be read. Never contains the PIN.
#[derive(Debug, thiserror::Error)]
pub enum UriError {
    /// The text does not start with `pkcs11:`.
    #[error("not a pkcs11: URI")]
    Scheme,
    /// An attribute has no `=`.
    #[error("attribute {0:?} has no value (expected name=value)")]
    MissingValue(String),
    /// An attribute appears twice.
    #[error("attribute {0:?} is given more than once")]
    Duplicate(String),
    /// A `%` is not followed by two hex digits, or the decoded text is not UTF-8.
    #[error("attribute {0:?} is not validly percent-encoded UTF-8")]
    Encoding(String),
    /// `slot-id` is not a decimal number.
    #[error("slot-id must be a decimal number")]
    SlotId,
    /// Both `pin-value` and `pin-source`.
    #[error("pin-value and pin-source cannot both be given")]
    TwoPins,
    /// `pin-source` is not a local file.
    #[error("pin-source must be a file (file:/path or an absolute path)")]
    PinSourceScheme,
    /// The PIN file cannot be read.
    #[error("cannot read the PIN file {path}")]
    PinFile {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

fn valid_percent_encoding(value: &str) -> bool {
    let bytes = value.as_bytes();
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let hex = |offset: usize| bytes.get(index + offset).is_some_and(u8::is_ascii_hexdigit);
            if !(hex(1) && hex(2)) {
                return false;
            }
            index += 3;
        } else {
            index += 1;
        }
    }
    true
}

fn decode_bytes(name: &str, value: &str) -> Result<Vec<u8>, UriError> {
    if !valid_percent_encoding(value) {
        return Err(UriError::Encoding(name.to_owned()));
    }
    Ok(percent_encoding::percent_decode_str(value).collect())
}

fn decode_text(name: &str, value: &str) -> Result<String, UriError> {
    String::from_utf8(decode_bytes(name, value)?).map_err(|_| UriError::Encoding(name.to_owned()))
}

impl Pkcs11Uri {
    /// Parses `text` (scheme matched case-insensitively).
    pub fn parse(text: &str) -> Result<Pkcs11Uri, UriError> {
        let scheme_length = "pkcs11:".len();
        let rest = match text.get(..scheme_length) {
            Some(scheme) if scheme.eq_ignore_ascii_case("pkcs11:") => &text[scheme_length..],
            _ => return Err(UriError::Scheme),
        };
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut uri = Pkcs11Uri::default();
        let mut seen: Vec<String> = Vec::new();
        let mut pin_value: Option<String> = None;
        let mut pin_source: Option<String> = None;
        let attributes = path
            .split(';')
            .map(|attribute| (attribute, false))
            .chain(query.split('&').map(|attribute| (attribute, true)));
        for (attribute, in_query) in attributes {
            if attribute.is_empty() {
                continue;
            }
            let (name, value) = attribute
                .split_once('=')
                .ok_or_else(|| UriError::MissingValue(attribute.to_owned()))?;
            if seen.iter().any(|previous| previous == name) {
                return Err(UriError::Duplicate(name.to_owned()));
            }
            seen.push(name.to_owned());
            match (name, in_query) {
                ("slot-id", false) => {
                    let text = decode_text(name, value)?;
                    if text.is_empty() || !text.bytes().all(|byte| byte.is_ascii_digit()) {
                        return Err(UriError::SlotId);
                    }
                    uri.slot_id = Some(text.parse().map_err(|_| UriError::SlotId)?);
                }
                ("token", false) => uri.token = Some(decode_text(name, value)?),
                ("object", false) => uri.object = Some(decode_text(name, value)?),
                ("id", false) => uri.id = Some(decode_bytes(name, value)?),
                ("pin-value", true) => pin_value = Some(decode_text(name, value)?),
                ("pin-source", true) => pin_source = Some(decode_text(name, value)?),
                _ => {}
            }
        }
        uri.pin = match (pin_value, pin_source) {
            (Some(_), Some(_)) => return Err(UriError::TwoPins),
            (Some(value), None) => Some(PinSource::Value(AuthPin::from(value))),
            (None, Some(source)) => Some(PinSource::File(pin_file_path(&source)?)),
            (None, None) => None,
        };
        Ok(uri)
    }
}

/// `file:/p`, `file:///p`, `file://localhost/p` or `/p` → `/p`.
fn pin_file_path(source: &str) -> Result<PathBuf, UriError> {
    let path = match source.strip_prefix("file:") {
        Some(rest) => match rest.strip_prefix("//") {
            Some(authority_and_path) => {
                let slash = authority_and_path
                    .find('/')
                    .ok_or(UriError::PinSourceScheme)?;
                match &authority_and_path[..slash] {
                    "" | "localhost" => &authority_and_path[slash..],
                    _ => return Err(UriError::PinSourceScheme),
                }
            }
            None => rest,
        },
        None => source,
    };
    if !path.starts_with('/') {
        return Err(UriError::PinSourceScheme);
    }
    Ok(PathBuf::from(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret as _;

    fn pin_of(uri: &Pkcs11Uri) -> String {
        uri.pin
            .as_ref()
            .unwrap()
            .resolve()
            .unwrap()
            .expose_secret()
            .to_owned()
    }

    #[test]
    fn parses_path_and_query_attributes() {
        let uri = Pkcs11Uri::parse(
            "pkcs11:slot-id=0;object=device%20id;type=private;id=%01%ff?pin-value=12%334&module-name=x",
        )
        .unwrap();
        assert_eq!(uri.slot_id, Some(0));
        assert_eq!(uri.object.as_deref(), Some("device id"));
        assert_eq!(uri.id.as_deref(), Some(&[1_u8, 0xff][..]));
        assert_eq!(uri.token, None);
        assert_eq!(pin_of(&uri), "1234");
        assert!(!format!("{uri:?}").contains("1234"));

        let uri = Pkcs11Uri::parse("PKCS11:token=Key%20pairs").unwrap();
        assert_eq!(uri.token.as_deref(), Some("Key pairs"));
        assert!(uri.pin.is_none());
        assert!(Pkcs11Uri::parse("pkcs11:").unwrap().slot_id.is_none());
    }

    #[test]
    fn refuses_malformed_uris() {
        let cases = [
            ("file:///x", "not a pkcs11"),
            ("pkcs11:slot-id=abc", "decimal"),
            ("pkcs11:slot-id=-1", "decimal"),
            ("pkcs11:token", "no value"),
            ("pkcs11:token=a;token=b", "more than once"),
            ("pkcs11:object=%zz", "percent"),
            ("pkcs11:object=%ff", "percent"),
            ("pkcs11:?pin-value=1&pin-source=file:/x", "cannot both"),
            ("pkcs11:?pin-source=https://x/y", "pin-source"),
            ("pkcs11:?pin-source=relative", "pin-source"),
        ];
        for (text, expected) in cases {
            let error = Pkcs11Uri::parse(text).unwrap_err().to_string();
            assert!(error.contains(expected), "{text}: {error}");
        }
    }

    #[test]
    fn pin_source_reads_the_first_line_of_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pin");
        std::fs::write(&path, "s3cret\n").unwrap();
        for form in [
            format!("file:{}", path.display()),
            format!("file://{}", path.display()),
            path.display().to_string(),
        ] {
            let uri = Pkcs11Uri::parse(&format!("pkcs11:token=t?pin-source={form}")).unwrap();
            assert_eq!(pin_of(&uri), "s3cret");
        }
        let missing = Pkcs11Uri::parse("pkcs11:?pin-source=file:/nonexistent/pin").unwrap();
        let error = missing.pin.unwrap().resolve().unwrap_err().to_string();
        assert!(error.contains("/nonexistent/pin"), "{error}");
    }
}
