//! Rules for what people type. Lengths count characters (Unicode scalar
//! values), not bytes: 4096 Persian letters are 8 KiB of UTF-8 and still one
//! allowed message. Message text is stored exactly as sent, byte for byte.

use crate::DomainError;
use hamgam_types::limits;

/// Usernames are ASCII letters, digits and `_`, compared without case (as on
/// the messengers people know). Returns the lowercase lookup key.
pub fn username_key(username: &str) -> Result<String, DomainError> {
    let chars = username.chars().count();
    if !(limits::USERNAME_CHARS_MIN..=limits::USERNAME_CHARS_MAX).contains(&chars) {
        return Err(DomainError::InvalidUsername(format!(
            "a username has {} to {} characters",
            limits::USERNAME_CHARS_MIN,
            limits::USERNAME_CHARS_MAX
        )));
    }
    if !username.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(DomainError::InvalidUsername("a username uses only letters a-z, digits and _".into()));
    }
    if !username.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return Err(DomainError::InvalidUsername("a username starts with a letter".into()));
    }
    Ok(username.to_ascii_lowercase())
}

pub fn check_password(password: &str) -> Result<(), DomainError> {
    if password.len() > limits::PASSWORD_BYTES_MAX {
        return Err(DomainError::WeakPassword(format!("a password has at most {} bytes", limits::PASSWORD_BYTES_MAX)));
    }
    if password.chars().count() < limits::PASSWORD_CHARS_MIN {
        return Err(DomainError::WeakPassword(format!(
            "a password has at least {} characters",
            limits::PASSWORD_CHARS_MIN
        )));
    }
    Ok(())
}

pub fn check_message_text(text: &str) -> Result<(), DomainError> {
    let chars = text.chars().count();
    if chars > limits::MESSAGE_TEXT_CHARS_MAX {
        return Err(DomainError::TextTooLong { chars, max: limits::MESSAGE_TEXT_CHARS_MAX });
    }
    if is_blank(text) {
        return Err(DomainError::TextEmpty);
    }
    Ok(())
}

/// A label (display name, group title, device name): bounded, one line.
pub fn check_label(what: &'static str, text: &str, chars_max: usize, required: bool) -> Result<(), DomainError> {
    let chars = text.chars().count();
    if chars > chars_max {
        return Err(DomainError::InvalidArgument(format!("{what} has at most {chars_max} characters")));
    }
    if required && is_blank(text) {
        return Err(DomainError::InvalidArgument(format!("{what} is empty")));
    }
    if text.chars().any(|c| c.is_control()) {
        return Err(DomainError::InvalidArgument(format!("{what} holds control characters")));
    }
    Ok(())
}

/// Blank means nothing a reader would see: whitespace and the invisible
/// joiners common in Persian text (ZWNJ U+200C, ZWJ U+200D) count as nothing.
fn is_blank(text: &str) -> bool {
    text.chars().all(|c| c.is_whitespace() || matches!(c, '\u{200c}' | '\u{200d}' | '\u{feff}'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_are_case_insensitive_ascii() {
        assert_eq!(username_key("Sara_1").unwrap(), "sara_1");
        assert!(username_key("ab").is_err());
        assert!(username_key("سارا").is_err());
        assert!(username_key("1abc").is_err());
        assert!(username_key(&"a".repeat(33)).is_err());
    }

    #[test]
    fn message_length_counts_characters_not_bytes() {
        let persian = "س".repeat(limits::MESSAGE_TEXT_CHARS_MAX);
        assert_eq!(persian.len(), 2 * limits::MESSAGE_TEXT_CHARS_MAX);
        assert!(check_message_text(&persian).is_ok());
        let over = "س".repeat(limits::MESSAGE_TEXT_CHARS_MAX + 1);
        assert!(matches!(check_message_text(&over), Err(DomainError::TextTooLong { .. })));
        assert_eq!(check_message_text(" \u{200c}\n"), Err(DomainError::TextEmpty));
    }
}
