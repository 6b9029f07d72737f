//! The gateway: how users reach agents through a [`Server`](crate::Server) without being
//! rd library code themselves. The `/client` HTTP proxy ([`proxy`]), HTTP `CONNECT`
//! ([`connect`]), SOCKS5 ([`socks5`]), fixed port forwards ([`forward`], and
//! [`forward_udp`] for datagrams), the PROXY protocol ([`proxy_protocol`]) and the copy
//! loop they share ([`splice`]).
//!
//! It stands beside the server, not inside it: it uses the server's public API only
//! ([`Server::dialer`](crate::Server::dialer), [`Server::has_session`](crate::Server::has_session),
//! [`Server::metrics`](crate::Server::metrics)) and its one events interface
//! ([`Server::subscribe`](crate::Server::subscribe) with [`ServerEvents`](crate::ServerEvents),
//! [`Server::shutdown_token`](crate::Server::shutdown_token)), so a library user can build
//! a gateway of their own the same way. See docs/architecture.md.

pub mod connect;
pub mod forward;
pub mod forward_udp;
pub mod proxy;
mod proxy_connector;
pub mod proxy_protocol;
mod proxy_upgrade;
pub mod socks5;
pub mod splice;
mod tunnel_use;
