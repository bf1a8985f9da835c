//! The SSRF guard: deliveries connect only to addresses the app allows.
//!
//! Webhook URLs are typed in by strangers, so a sender that connects wherever a URL points can
//! be made to call the cloud metadata service, an admin port on localhost, or a database on the
//! private network. The guard is on by default, and checks **addresses, not URL text**:
//!
//! * URLs with an IP literal (`http://10.0.0.1/`, `http://[::ffff:127.0.0.1]/`,
//!   `http://2130706433/`) are checked before anything is sent;
//! * host names go through [`GuardedResolver`], which drops refused addresses from the answer,
//!   so the connection is made to a checked address (no DNS rebinding window);
//! * redirects are not followed, and proxies from the environment are not used; an
//!   [`EgressProxy`] set on the worker gets the destination checked before it is asked.
//!
//! A refused target is a fatal outcome: the delivery is dead-lettered with an
//! [`EgressRefused`] reason, not retried. [`EgressPolicy`] says what is allowed; the default
//! allows public addresses only.
//!
//! ```
//! use std::net::IpAddr;
//! use apalis_webhooks::ssrf::{AddressClass, classify};
//!
//! assert_eq!(classify("93.184.215.14".parse::<IpAddr>().unwrap()), AddressClass::Public);
//! assert_eq!(classify("169.254.169.254".parse::<IpAddr>().unwrap()), AddressClass::LinkLocal);
//! assert_eq!(classify("::ffff:10.0.0.1".parse::<IpAddr>().unwrap()), AddressClass::Private);
//! assert!(!classify("::1".parse::<IpAddr>().unwrap()).is_public());
//! ```

mod classify;
mod policy;
mod proxy;
mod resolver;

pub use classify::{AddressClass, classify};
pub use ipnet::IpNet;
pub use policy::{EgressPolicy, EgressRefused};
pub use proxy::{EgressProxy, ProxyUrlError};
pub use resolver::GuardedResolver;
