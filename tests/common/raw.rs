//! Raw HTTP/1 over a socket for the tests that send exact bytes: read one response back, head
//! and body (Content-Length, chunked, or up to the close), without consuming what follows.
#![allow(dead_code)]

use tokio::io::{AsyncRead, AsyncReadExt};

/// A response read off a raw socket.
#[derive(Debug)]
pub struct RawReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads a message head (through the blank line) byte by byte, so nothing after it is consumed.
pub async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<String> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 64 * 1024 {
            return Err(std::io::Error::other("head longer than 64 KiB"));
        }
        head.push(s.read_u8().await?);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// Reads one CRLF-terminated line (without the CRLF).
pub async fn read_line<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<String> {
    let mut line = Vec::new();
    while !line.ends_with(b"\r\n") {
        if line.len() > 8 * 1024 {
            return Err(std::io::Error::other("line longer than 8 KiB"));
        }
        line.push(s.read_u8().await?);
    }
    line.truncate(line.len() - 2);
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// Reads one response: the head, then the body framed by Content-Length, chunked encoding, or
/// the end of the connection (none for 1xx, 204, 304).
pub async fn read_response<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<RawReply> {
    let head = read_head(s).await?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {status_line:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut reply = RawReply {
        status,
        headers,
        body: Vec::new(),
    };
    if (100..200).contains(&status) || status == 204 || status == 304 {
        return Ok(reply);
    }
    if let Some(len) = reply.header("content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| std::io::Error::other("bad content-length"))?;
        reply.body = vec![0; len];
        s.read_exact(&mut reply.body).await?;
    } else if reply
        .header("transfer-encoding")
        .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"))
    {
        let mut body = Vec::new();
        let mut done = false;
        for _ in 0..1_000_000 {
            let size_line = read_line(s).await?;
            let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| std::io::Error::other(format!("bad chunk size {size_line:?}")))?;
            if size == 0 {
                // Trailers, up to the blank line.
                for _ in 0..1_000 {
                    if read_line(s).await?.is_empty() {
                        break;
                    }
                }
                done = true;
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            s.read_exact(&mut body[start..]).await?;
            read_line(s).await?;
        }
        if !done {
            return Err(std::io::Error::other("too many chunks"));
        }
        reply.body = body;
    } else {
        s.read_to_end(&mut reply.body).await?;
    }
    Ok(reply)
}

/// Sends `request` on a new connection and reads one response (10 s at most).
pub async fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> RawReply {
    use tokio::io::AsyncWriteExt;
    tokio::time::timeout(std::time::Duration::from_secs(10), async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(request).await?;
        read_response(&mut s).await
    })
    .await
    .expect("raw exchange within 10 s")
    .expect("raw exchange succeeds")
}
