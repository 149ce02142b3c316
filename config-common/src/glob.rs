//! Principal globs: the pattern language of `[[principal]] keys = [...]` / `certs = [...]`.

/// Whether `text` matches `pattern`: `*` matches any run of characters including none, `?`
/// exactly one character, everything else is literal; the whole text must match,
/// case-sensitively, and `/` is not special.
pub fn glob_matches(pattern: &str, text: &str) -> bool {
    let pattern: Vec<char> = pattern.chars().collect();
    let text: Vec<char> = text.chars().collect();
    let (mut pattern_index, mut text_index) = (0, 0);
    // Where the last `*` was, and how much text it has swallowed so far.
    let mut backtrack: Option<(usize, usize)> = None;
    while text_index < text.len() {
        match pattern.get(pattern_index) {
            Some('*') => {
                backtrack = Some((pattern_index, text_index));
                pattern_index += 1;
            }
            Some(&character) if character == '?' || character == text[text_index] => {
                pattern_index += 1;
                text_index += 1;
            }
            _ => match backtrack {
                Some((star, matched)) => {
                    pattern_index = star + 1;
                    text_index = matched + 1;
                    backtrack = Some((star, matched + 1));
                }
                None => return false,
            },
        }
    }
    pattern[pattern_index..]
        .iter()
        .all(|&character| character == '*')
}

#[cfg(test)]
mod tests {
    use super::glob_matches;

    #[test]
    fn globs() {
        let cases = [
            ("device-id", "device-id", true),
            ("device-id", "device-id-temp", false),
            ("device-*", "device-id-temp", true),
            ("*", "", true),
            ("?", "", false),
            ("a?c", "abc", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("est-id-*-temp", "est-id-x/y-temp", true),
            (
                "aziot-edged/module/*",
                "aziot-edged/module/edgeHub:1:server",
                true,
            ),
            ("Key", "key", false),
            ("é?", "éü", true),
        ];
        for (pattern, text, expected) in cases {
            assert_eq!(glob_matches(pattern, text), expected, "{pattern} vs {text}");
        }
    }
}
