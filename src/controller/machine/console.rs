//! Pure: the tail of a guest's serial console made fit for a condition message and an Event —
//! secrets redacted (any word of the machine's bootstrap data, kubeadm bootstrap tokens), control
//! characters removed, the last [`MAX_CHARS`] characters kept.

use crate::libvirt::error::sanitise;

/// How many bytes of the console the backend is asked for.
pub const TAIL_BYTES: u64 = 4096;
/// How many characters of it a message keeps (the end: the latest output).
pub const MAX_CHARS: usize = 400;
/// Words shorter than this are never redacted (they carry no secret on their own).
const MIN_SECRET_WORD: usize = 8;

/// The console tail, redacted and bounded.
pub fn summary(console: &str, bootstrap: &[u8]) -> String {
    let redacted: Vec<String> = console
        .split_inclusive(char::is_whitespace)
        .map(|piece| {
            let word = piece.trim_end();
            if is_secret(word, bootstrap) {
                format!("[redacted]{}", &piece[word.len()..])
            } else {
                piece.to_owned()
            }
        })
        .collect();
    let redacted = redacted.concat();
    let chars: Vec<char> = redacted.chars().collect();
    let start = chars.len().saturating_sub(MAX_CHARS);
    let tail: String = chars[start..].iter().collect();
    sanitise(&tail)
}

/// Whether `word` appears in the bootstrap data or looks like a kubeadm token.
fn is_secret(word: &str, bootstrap: &[u8]) -> bool {
    let core = word.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    if is_kubeadm_token(core) {
        return true;
    }
    word.len() >= MIN_SECRET_WORD
        && bootstrap
            .windows(word.len())
            .any(|window| window == word.as_bytes())
}

/// `[a-z0-9]{6}.[a-z0-9]{16}`.
fn is_kubeadm_token(word: &str) -> bool {
    let bytes = word.as_bytes();
    bytes.len() == 23
        && bytes[6] == b'.'
        && bytes
            .iter()
            .enumerate()
            .all(|(i, b)| i == 6 || b.is_ascii_digit() || b.is_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_and_the_end_is_kept() {
        let bootstrap = b"#cloud-config\nwrite_files:\n- content: s3cr3t-c0ntent-marker\n";
        let console = format!(
            "{}\nboot: wrote s3cr3t-c0ntent-marker to disk\r\n\
             kubeadm join 10.0.0.1:6443 --token abcdef.0123456789abcdef\n\x1b[31mlogin:",
            "noise ".repeat(200)
        );
        let out = summary(&console, bootstrap);
        assert!(!out.contains("s3cr3t"), "{out}");
        assert!(!out.contains("abcdef.0123456789abcdef"), "{out}");
        assert!(out.contains("[redacted]"), "{out}");
        assert!(out.ends_with("login:"), "the latest output is kept: {out}");
        assert!(out.chars().count() <= MAX_CHARS + 1);
        assert!(!out.chars().any(char::is_control));
        assert!(out.contains("kubeadm join"), "{out}");
    }
}
