//! A connection to one broker that speaks the Kafka protocol itself, for
//! the few requests librdkafka has no API for: the transaction tools of
//! KIP-664 (`DescribeTransactions`, `DescribeProducers`, `WriteTxnMarkers`,
//! what `kafka-transactions.sh` sends). The messages are
//! `kafka-protocol`'s; this module frames them (a size, a header, a body)
//! over a plain TCP connection, one request at a time.
//!
//! Plaintext only: a cluster reached over TLS or SASL (`security.protocol`
//! in the client options) is refused with [`WireError::Security`], and the
//! callers say what they could not do.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::{RequestHeader, ResponseHeader};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, Request, StrBytes};

/// Why a call to a broker failed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The broker could not be reached, or did not answer in time.
    #[error("{address}: {source}")]
    Io {
        /// The broker, `host:port`.
        address: String,
        /// What the socket said.
        source: std::io::Error,
    },
    /// The broker answered something this client cannot read (or it could
    /// not encode the request at that version).
    #[error("{address}: {message}")]
    Protocol {
        /// The broker, `host:port`.
        address: String,
        /// What was wrong.
        message: String,
    },
    /// The client options ask for TLS or SASL, which this client does not
    /// speak.
    #[error(
        "security.protocol {0} is not supported by Sluice's own Kafka requests (plaintext only)"
    )]
    Security(String),
}

/// Whether the client settings let this module talk to the brokers:
/// `security.protocol` unset or `plaintext`.
pub fn check_security(protocol: Option<&str>) -> Result<(), WireError> {
    match protocol {
        None => Ok(()),
        Some(p) if p.eq_ignore_ascii_case("plaintext") => Ok(()),
        Some(p) => Err(WireError::Security(p.to_owned())),
    }
}

/// One connection to one broker.
pub struct Connection {
    address: String,
    stream: TcpStream,
    correlation_id: i32,
}

impl Connection {
    /// Connects to `address` (`host:port`); `timeout` bounds the connect
    /// and each read and write.
    pub fn open(address: &str, timeout: Duration) -> Result<Self, WireError> {
        let io = |source| WireError::Io {
            address: address.to_owned(),
            source,
        };
        let mut last = None;
        for socket in address.to_socket_addrs().map_err(io)? {
            match TcpStream::connect_timeout(&socket, timeout) {
                Ok(stream) => {
                    stream.set_read_timeout(Some(timeout)).map_err(io)?;
                    stream.set_write_timeout(Some(timeout)).map_err(io)?;
                    stream.set_nodelay(true).map_err(io)?;
                    return Ok(Self {
                        address: address.to_owned(),
                        stream,
                        correlation_id: 0,
                    });
                }
                Err(e) => last = Some(e),
            }
        }
        Err(io(last.unwrap_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, "no address")
        })))
    }

    /// The broker's address, `host:port`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Sends `request` at `version` and reads its response.
    pub fn call<R: Request>(
        &mut self,
        version: i16,
        request: &R,
    ) -> Result<R::Response, WireError> {
        self.correlation_id += 1;
        let header = RequestHeader::default()
            .with_request_api_key(R::KEY)
            .with_request_api_version(version)
            .with_correlation_id(self.correlation_id)
            .with_client_id(Some(StrBytes::from_static_str("sluice")));
        let mut body = BytesMut::new();
        header
            .encode(&mut body, R::header_version(version))
            .and_then(|()| request.encode(&mut body, version))
            .map_err(|e| self.protocol(format!("encoding request {} v{version}: {e}", R::KEY)))?;
        let mut frame = BytesMut::with_capacity(body.len() + 4);
        frame.put_i32(body.len() as i32);
        frame.put(body);
        let io = |address: &str, source| WireError::Io {
            address: address.to_owned(),
            source,
        };
        self.stream
            .write_all(&frame)
            .map_err(|e| io(&self.address, e))?;
        let mut size = [0u8; 4];
        self.stream
            .read_exact(&mut size)
            .map_err(|e| io(&self.address, e))?;
        let size = i32::from_be_bytes(size);
        if !(4..=64 << 20).contains(&size) {
            return Err(self.protocol(format!("a response of {size} bytes")));
        }
        let mut response = vec![0u8; size as usize];
        self.stream
            .read_exact(&mut response)
            .map_err(|e| io(&self.address, e))?;
        let mut response = Bytes::from(response);
        let header = ResponseHeader::decode(
            &mut response,
            <R::Response as HeaderVersion>::header_version(version),
        )
        .map_err(|e| self.protocol(format!("decoding a response header: {e}")))?;
        if header.correlation_id != self.correlation_id {
            return Err(self.protocol(format!(
                "a response to request {} where {} was expected",
                header.correlation_id, self.correlation_id
            )));
        }
        let decoded = R::Response::decode(&mut response, version)
            .map_err(|e| self.protocol(format!("decoding response {} v{version}: {e}", R::KEY)))?;
        if response.has_remaining() {
            return Err(self.protocol(format!(
                "{} bytes left after response {} v{version}",
                response.remaining(),
                R::KEY
            )));
        }
        Ok(decoded)
    }

    fn protocol(&self, message: String) -> WireError {
        WireError::Protocol {
            address: self.address.clone(),
            message,
        }
    }
}

/// Kafka's name for a response's error code, for messages
/// (`kafka-protocol`'s, e.g. `NotCoordinator`).
pub fn error_name(code: i16) -> String {
    ResponseError::try_from_code(code).map_or_else(|| "None".to_owned(), |e| e.to_string())
}

/// Whether a retry can help with an error code: Kafka's retriable errors (a
/// leader or coordinator moving or loading, a request timed out), and
/// `CONCURRENT_TRANSACTIONS` (the coordinator is still ending a transaction).
pub fn retriable(code: i16) -> bool {
    ResponseError::try_from_code(code)
        .is_some_and(|e| e.is_retriable() || e == ResponseError::ConcurrentTransactions)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plaintext_is_spoken() {
        assert!(check_security(None).is_ok());
        assert!(check_security(Some("PLAINTEXT")).is_ok());
        let refused = check_security(Some("SASL_SSL")).unwrap_err();
        assert!(refused.to_string().contains("SASL_SSL"), "{refused}");
    }

    #[test]
    fn error_codes_are_named_and_told_retriable_as_kafka_does() {
        assert_eq!(error_name(16), "NotCoordinator");
        assert!(retriable(16) && retriable(51));
        assert!(!retriable(0) && !retriable(31) && !retriable(105));
    }

    #[test]
    fn a_broker_that_does_not_answer_is_an_io_error_naming_it() {
        // A port nothing listens on (bound, then closed).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let address = format!("127.0.0.1:{port}");
        let Err(error) = Connection::open(&address, Duration::from_secs(1)) else {
            panic!("nothing listens on {address}");
        };
        assert!(matches!(error, WireError::Io { .. }), "{error}");
        assert!(error.to_string().starts_with(&address), "{error}");
    }
}
