//! Certificate subjects as certd's configuration and API name them: the short attribute names
//! (`CN`, `O`, ...), their OIDs and DN order, and the DER `Name` built from (attribute, value)
//! pairs. certd builds the subjects it issues with these; identityd builds its CSRs' subjects
//! with them (the CSR is signed by keyd, so no OpenSSL name builder).

use der::asn1::{Any, ObjectIdentifier, SetOfVec};
use der::{Tag, Tagged as _};
use x509_cert::attr::AttributeTypeAndValue;
use x509_cert::name::{Name, RdnSequence, RelativeDistinguishedName};

/// Short names accepted in `subject` tables, their OIDs, and their place in the DN (lower first).
pub const ATTRIBUTES: &[(&str, &str)] = &[
    ("DC", "0.9.2342.19200300.100.1.25"),
    ("C", "2.5.4.6"),
    ("ST", "2.5.4.8"),
    ("L", "2.5.4.7"),
    ("street", "2.5.4.9"),
    ("postalCode", "2.5.4.17"),
    ("O", "2.5.4.10"),
    ("OU", "2.5.4.11"),
    ("title", "2.5.4.12"),
    ("SN", "2.5.4.4"),
    ("GN", "2.5.4.42"),
    ("initials", "2.5.4.43"),
    ("pseudonym", "2.5.4.65"),
    ("dnQualifier", "2.5.4.46"),
    ("serialNumber", "2.5.4.5"),
    ("CN", "2.5.4.3"),
    ("UID", "0.9.2342.19200300.100.1.1"),
    ("emailAddress", "1.2.840.113549.1.9.1"),
];

/// Longest common name, in characters (RFC 5280 `ub-common-name`).
pub const MAX_COMMON_NAME_CHARS: usize = 64;

/// commonName.
pub const OID_COMMON_NAME: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.3");
const OID_COUNTRY: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.6");
const OID_EMAIL_ADDRESS: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.1");
const OID_DOMAIN_COMPONENT: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("0.9.2342.19200300.100.1.25");

/// The OID of a short attribute name of [`ATTRIBUTES`], compared without regard to case
/// (`street` and `STREET` are the same attribute).
pub fn attribute_oid(short_name: &str) -> Option<ObjectIdentifier> {
    ATTRIBUTES
        .iter()
        .find(|(known, _)| known.eq_ignore_ascii_case(short_name))
        .and_then(|(_, oid)| ObjectIdentifier::new(oid).ok())
}

/// An attribute value with the string type X.509 expects: PrintableString for a country that
/// fits it, IA5String for e-mail addresses and domain components, UTF8String otherwise.
pub fn attribute_value(oid: ObjectIdentifier, value: &str) -> Result<Any, der::Error> {
    let printable = |text: &str| {
        text.bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || b" '()+,-./:=?".contains(&byte))
    };
    let tag = if oid == OID_COUNTRY && printable(value) {
        Tag::PrintableString
    } else if (oid == OID_EMAIL_ADDRESS || oid == OID_DOMAIN_COMPONENT) && value.is_ascii() {
        Tag::Ia5String
    } else {
        Tag::Utf8String
    };
    Any::new(tag, value.as_bytes())
}

/// A name of one-attribute RDNs, in the given order.
pub fn name(attributes: &[(ObjectIdentifier, &str)]) -> Result<Name, der::Error> {
    let mut rdns = Vec::with_capacity(attributes.len());
    for (oid, value) in attributes {
        let mut set = SetOfVec::new();
        set.insert(AttributeTypeAndValue {
            oid: *oid,
            value: attribute_value(*oid, value)?,
        })?;
        rdns.push(RelativeDistinguishedName(set));
    }
    Ok(RdnSequence(rdns))
}

/// The first common name of `name` as text (UTF8String, PrintableString or IA5String).
pub fn common_name(name: &Name) -> Option<String> {
    name.0
        .iter()
        .flat_map(|rdn| rdn.0.iter())
        .find(|attribute| attribute.oid == OID_COMMON_NAME)
        .filter(|attribute| {
            matches!(
                attribute.value.tag(),
                Tag::Utf8String | Tag::PrintableString | Tag::Ia5String
            )
        })
        .and_then(|attribute| std::str::from_utf8(attribute.value.value()).ok())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use der::{Decode as _, Encode as _};

    #[test]
    fn names_round_trip_with_their_string_types() {
        let attributes = [
            (attribute_oid("c").unwrap(), "DE"),
            (attribute_oid("O").unwrap(), "Contoso Ltd"),
            (attribute_oid("emailaddress").unwrap(), "ops@example.com"),
            (attribute_oid("CN").unwrap(), "device-1"),
        ];
        let built = name(&attributes).unwrap();
        let parsed = Name::from_der(&built.to_der().unwrap()).unwrap();
        let tags: Vec<Tag> = parsed
            .0
            .iter()
            .map(|rdn| rdn.0.get(0).unwrap().value.tag())
            .collect();
        assert_eq!(
            tags,
            [
                Tag::PrintableString,
                Tag::Utf8String,
                Tag::Ia5String,
                Tag::Utf8String
            ]
        );
        assert_eq!(common_name(&parsed).as_deref(), Some("device-1"));
        let oids: Vec<ObjectIdentifier> = parsed
            .0
            .iter()
            .map(|rdn| rdn.0.get(0).unwrap().oid)
            .collect();
        let expected: Vec<ObjectIdentifier> = attributes.iter().map(|(oid, _)| *oid).collect();
        assert_eq!(oids, expected, "the order given is the order in the DN");
        assert!(attribute_oid("nonsense").is_none());
    }
}
