//! Passwords, session tokens and the failed-login limiter.
//!
//! Passwords are hashed with argon2id (memory-hard) off the async threads,
//! with a bound on how many hashes run at once so a burst of logins cannot
//! take all memory. A session token is `hg1_` + base64url(user, device,
//! 32 random bytes); the node stores only blake3 of the random part, which is
//! enough for a 256-bit secret (no KDF needed: it cannot be guessed).

use crate::ApiError;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hamgam_proto::ErrorCode;
use hamgam_types::{DeviceId, UserId, limits};
use rand::RngCore;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

const TOKEN_PREFIX: &str = "hg1_";

/// argon2id cost parameters.
#[derive(Clone, Copy, Debug)]
pub struct PasswordCost {
    pub memory_kib: u32,
    pub iterations: u32,
}

impl Default for PasswordCost {
    /// The OWASP recommendation for argon2id: 19 MiB, 2 passes, 1 lane.
    fn default() -> Self {
        PasswordCost { memory_kib: 19_456, iterations: 2 }
    }
}

#[derive(Clone)]
pub(crate) struct Passwords {
    argon2: argon2::Argon2<'static>,
    permits: Arc<Semaphore>,
    /// A hash of nothing, verified against when the user does not exist so a
    /// wrong username costs the same time as a wrong password.
    decoy: String,
}

impl Passwords {
    pub(crate) fn new(cost: PasswordCost) -> Result<Passwords, ApiError> {
        let params = argon2::Params::new(cost.memory_kib, cost.iterations, 1, None)
            .map_err(|e| ApiError::config(format!("argon2 parameters: {e}")))?;
        let argon2 = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let parallel = std::thread::available_parallelism().map_or(2, |n| n.get()) * 2;
        let mut passwords = Passwords { argon2, permits: Arc::new(Semaphore::new(parallel)), decoy: String::new() };
        passwords.decoy = passwords.hash_now("decoy password")?;
        Ok(passwords)
    }

    fn hash_now(&self, password: &str) -> Result<String, ApiError> {
        let mut salt = [0u8; 16];
        rand::rng().fill_bytes(&mut salt);
        let salt = SaltString::encode_b64(&salt).map_err(|e| ApiError::internal(format!("salt: {e}")))?;
        let hash = self.argon2.hash_password(password.as_bytes(), &salt).map_err(|e| ApiError::internal(format!("hash: {e}")))?;
        Ok(hash.to_string())
    }

    pub(crate) async fn hash(&self, password: String) -> Result<String, ApiError> {
        let _permit = self.permits.acquire().await.map_err(|_| ApiError::unavailable("shutting down"))?;
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.hash_now(&password))
            .await
            .map_err(|e| ApiError::internal(format!("hash task: {e}")))?
    }

    /// True if `password` matches `phc`; with `None`, checks against the decoy.
    pub(crate) async fn verify(&self, password: String, phc: Option<String>) -> Result<bool, ApiError> {
        let _permit = self.permits.acquire().await.map_err(|_| ApiError::unavailable("shutting down"))?;
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let real = phc.is_some();
            let phc = phc.unwrap_or_else(|| this.decoy.clone());
            let parsed = PasswordHash::new(&phc).map_err(|e| ApiError::internal(format!("stored hash: {e}")))?;
            Ok(this.argon2.verify_password(password.as_bytes(), &parsed).is_ok() && real)
        })
        .await
        .map_err(|e| ApiError::internal(format!("verify task: {e}")))?
    }
}

/// A token as handed to the client, and what it names.
pub(crate) struct Token {
    pub user: UserId,
    pub device: DeviceId,
    pub secret: [u8; 32],
}

impl Token {
    pub(crate) fn generate(user: UserId) -> Token {
        let mut rng = rand::rng();
        let mut secret = [0u8; 32];
        rng.fill_bytes(&mut secret);
        Token { user, device: DeviceId(rng.next_u64()), secret }
    }

    pub(crate) fn encode(&self) -> String {
        let mut raw = Vec::with_capacity(48);
        raw.extend_from_slice(&self.user.0.to_le_bytes());
        raw.extend_from_slice(&self.device.0.to_le_bytes());
        raw.extend_from_slice(&self.secret);
        format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(raw))
    }

    pub(crate) fn parse(text: &str) -> Result<Token, ApiError> {
        let bad = || ApiError::new(ErrorCode::INVALID_TOKEN, "that is not a session token of this service");
        let body = text.strip_prefix(TOKEN_PREFIX).ok_or_else(bad)?;
        if body.len() > 128 {
            return Err(bad());
        }
        let raw = URL_SAFE_NO_PAD.decode(body).map_err(|_| bad())?;
        if raw.len() != 48 {
            return Err(bad());
        }
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&raw[i..i + 8]);
            u64::from_le_bytes(w)
        };
        let mut secret = [0u8; 32];
        secret.copy_from_slice(&raw[16..]);
        Ok(Token { user: UserId(word(0)), device: DeviceId(word(8)), secret })
    }

    pub(crate) fn secret_hash(&self) -> [u8; 32] {
        *blake3::hash(&self.secret).as_bytes()
    }
}

/// Constant-time comparison of two token hashes.
pub(crate) fn hashes_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Clone, PartialEq, Eq, Hash)]
enum LimiterKey {
    Username(String),
    Address(IpAddr),
}

struct Window {
    started: Instant,
    failures: u32,
}

/// Counts failed logins per username and per remote address in fixed windows.
#[derive(Default)]
pub(crate) struct LoginLimiter {
    windows: Mutex<HashMap<LimiterKey, Window>>,
}

impl LoginLimiter {
    fn window_length() -> Duration {
        Duration::from_secs(limits::LOGIN_FAILURE_WINDOW_SECS)
    }

    /// `Err(wait)` when either key is over its limit.
    pub(crate) fn check(&self, username_key: &str, address: IpAddr) -> Result<(), Duration> {
        let windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let over = |key: LimiterKey, max: u32| -> Option<Duration> {
            let window = windows.get(&key)?;
            let left = Self::window_length().checked_sub(window.started.elapsed())?;
            (window.failures >= max).then_some(left)
        };
        let by_name = over(LimiterKey::Username(username_key.to_string()), limits::LOGIN_FAILURES_PER_USERNAME_MAX);
        let by_address = over(LimiterKey::Address(address), limits::LOGIN_FAILURES_PER_ADDRESS_MAX);
        match by_name.into_iter().chain(by_address).max() {
            Some(wait) => Err(wait),
            None => Ok(()),
        }
    }

    pub(crate) fn record_failure(&self, username_key: &str, address: IpAddr) {
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        if windows.len() >= limits::LOGIN_LIMITER_ENTRIES_MAX {
            windows.retain(|_, w| w.started.elapsed() < Self::window_length());
            if windows.len() >= limits::LOGIN_LIMITER_ENTRIES_MAX
                && let Some(oldest) = windows.iter().min_by_key(|(_, w)| w.started).map(|(k, _)| k.clone())
            {
                windows.remove(&oldest);
            }
        }
        for key in [LimiterKey::Username(username_key.to_string()), LimiterKey::Address(address)] {
            let window = windows.entry(key).or_insert(Window { started: Instant::now(), failures: 0 });
            if window.started.elapsed() >= Self::window_length() {
                *window = Window { started: Instant::now(), failures: 0 };
            }
            window.failures += 1;
        }
    }

    pub(crate) fn record_success(&self, username_key: &str) {
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        windows.remove(&LimiterKey::Username(username_key.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_garbage_is_refused() {
        let token = Token::generate(UserId(42));
        let parsed = Token::parse(&token.encode()).unwrap();
        assert_eq!((parsed.user, parsed.device, parsed.secret), (token.user, token.device, token.secret));
        assert!(hashes_equal(&parsed.secret_hash(), &token.secret_hash()));
        for bad in ["", "hg1_", "hg1_!!!", "xx1_AAAA", &"hg1_A".repeat(100)] {
            assert!(Token::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_limiter_stops_a_username_after_its_failures() {
        let limiter = LoginLimiter::default();
        let address: IpAddr = "127.0.0.1".parse().unwrap();
        for _ in 0..limits::LOGIN_FAILURES_PER_USERNAME_MAX {
            assert!(limiter.check("sara", address).is_ok());
            limiter.record_failure("sara", address);
        }
        assert!(limiter.check("sara", address).is_err());
        assert!(limiter.check("ali", address).is_ok(), "other usernames go on");
    }

    #[tokio::test]
    async fn passwords_verify_and_the_decoy_never_matches() {
        let passwords = Passwords::new(PasswordCost { memory_kib: 64, iterations: 1 }).unwrap();
        let phc = passwords.hash("رمز عبور امن".into()).await.unwrap();
        assert!(phc.starts_with("$argon2id$"));
        assert!(passwords.verify("رمز عبور امن".into(), Some(phc.clone())).await.unwrap());
        assert!(!passwords.verify("wrong".into(), Some(phc)).await.unwrap());
        assert!(!passwords.verify("decoy password".into(), None).await.unwrap());
    }
}
