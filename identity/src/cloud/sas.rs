//! SAS tokens (spec 9.1), signed by keyd with HMAC-SHA256 so the key never leaves keyd.

use base64::Engine as _;
use http_common::ClientError;
use key_api::{KeyHandle, SignMechanism};

/// Lifetime of every token minted.
pub const TOKEN_LIFETIME_SECS: u64 = 300;

/// The `sr` value: `percent-encode(lowercase(resource))`, everything outside RFC 3986
/// unreserved characters escaped.
pub fn encode_resource(resource: &str) -> String {
    super::encode_segment(&resource.to_lowercase(), false)
}

/// The string keyd signs: `<sr>\n<expiry>`.
pub fn string_to_sign(encoded_resource: &str, expiry: u64) -> String {
    format!("{encoded_resource}\n{expiry}")
}

/// Assembles the header value from a signature.
pub fn assemble(
    encoded_resource: &str,
    signature: &[u8],
    expiry: u64,
    key_name: Option<&str>,
) -> String {
    let signature = base64::engine::general_purpose::STANDARD.encode(signature);
    let mut token = format!(
        "SharedAccessSignature sr={encoded_resource}&sig={}&se={expiry}",
        super::encode_segment(&signature, false)
    );
    if let Some(key_name) = key_name {
        token.push_str("&skn=");
        token.push_str(&super::encode_segment(key_name, false));
    }
    token
}

/// Mints a token for `resource`, valid for [`TOKEN_LIFETIME_SECS`], signed in the TPM with its
/// authentication key (keyd's tpmd API).
pub async fn tpm_token(
    tpm: &key_api::tpm::TpmClient,
    resource: &str,
    key_name: Option<&str>,
) -> Result<String, ClientError> {
    let expiry = crate::util::unix_now() + TOKEN_LIFETIME_SECS;
    let encoded = encode_resource(resource);
    let message = string_to_sign(&encoded, expiry);
    let signature = tpm.sign_with_auth_key(message.as_bytes()).await?;
    Ok(assemble(&encoded, &signature, expiry, key_name))
}

/// Mints a token for `resource`, valid for [`TOKEN_LIFETIME_SECS`], signed by keyd.
pub async fn token(
    keyd: &key_api::Client,
    handle: &KeyHandle,
    resource: &str,
    key_name: Option<&str>,
) -> Result<String, ClientError> {
    let expiry = crate::util::unix_now() + TOKEN_LIFETIME_SECS;
    let encoded = encode_resource(resource);
    let message = string_to_sign(&encoded, expiry);
    let signature = keyd
        .sign(
            handle,
            SignMechanism::HmacSha256 {
                message: message.as_bytes(),
            },
        )
        .await?;
    Ok(assemble(&encoded, &signature, expiry, key_name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_an_independent_implementation() {
        let key = b"0123456789abcdef0123456789abcdef";
        let key_b64 = base64::engine::general_purpose::STANDARD.encode(key);
        let resource = "0ne00000000/registrations/My-Device";
        let encoded = encode_resource(resource);
        assert_eq!(encoded, "0ne00000000%2Fregistrations%2Fmy-device");
        let pkey = openssl::pkey::PKey::hmac(key).unwrap();
        let mut signer =
            openssl::sign::Signer::new(openssl::hash::MessageDigest::sha256(), &pkey).unwrap();
        signer
            .update(string_to_sign(&encoded, 1_900_000_000).as_bytes())
            .unwrap();
        let signature = signer.sign_to_vec().unwrap();
        let ours = assemble(&encoded, &signature, 1_900_000_000, Some("registration"));
        let theirs = cloud_emulator::sas::build_token(
            resource,
            &key_b64,
            1_900_000_000,
            Some("registration"),
        )
        .unwrap();
        assert_eq!(ours, theirs);
    }
}
