//! Normalizes RFC 7512 `pkcs11:` URIs the way `config apply` writes them into keyd's config:
//! the `object` label is percent-decoded and re-encoded with every character other than an
//! ASCII letter or digit escaped (`object=local-ca` → `object=local%2Dca`). keyd accepts both
//! spellings; writing one canonical form keeps generated files stable.

use percent_encoding::{percent_decode_str, utf8_percent_encode, NON_ALPHANUMERIC};

/// Re-serializes `uri` with a canonical `object` label. Other attributes and the query part
/// (`?pin-value=...`) are kept byte for byte. `None` when `uri` is not a `pkcs11:` URI or the
/// label is not UTF-8 after decoding.
pub fn normalize(uri: &str) -> Option<String> {
    let rest = uri.strip_prefix("pkcs11:")?;
    let (path, query) = match rest.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (rest, None),
    };
    let mut attributes = Vec::new();
    for attribute in path.split(';').filter(|attribute| !attribute.is_empty()) {
        match attribute.split_once('=') {
            Some(("object", label)) => {
                let decoded = percent_decode_str(label).decode_utf8().ok()?;
                attributes.push(format!(
                    "object={}",
                    utf8_percent_encode(&decoded, NON_ALPHANUMERIC)
                ));
            }
            _ => attributes.push(attribute.to_owned()),
        }
    }
    let mut normalized = format!("pkcs11:{}", attributes.join(";"));
    if let Some(query) = query {
        normalized.push('?');
        normalized.push_str(query);
    }
    Some(normalized)
}

#[cfg(test)]
mod tests {
    use super::normalize;

    fn check(input: &str, expected: &str) {
        assert_eq!(normalize(input).as_deref(), Some(expected), "{input}");
    }

    #[test]
    fn labels_are_escaped_once() {
        check(
            "pkcs11:slot-id=0;object=local-ca?pin-value=1234",
            "pkcs11:slot-id=0;object=local%2Dca?pin-value=1234",
        );
        check(
            "pkcs11:slot-id=0;object=local%2Dca?pin-value=1234",
            "pkcs11:slot-id=0;object=local%2Dca?pin-value=1234",
        );
        check(
            "pkcs11:token=Key%20pairs;object=device%20id",
            "pkcs11:token=Key%20pairs;object=device%20id",
        );
        check("pkcs11:token=t", "pkcs11:token=t");
        assert_eq!(normalize("file:///x"), None);
    }
}
