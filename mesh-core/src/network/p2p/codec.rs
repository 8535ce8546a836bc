//! The request-response codec: length-prefixed prost frames, limits
//! checked before anything is allocated.

use super::*;

/// A request as the codec sees it.
#[derive(Debug)]
pub(crate) enum RrRequest {
    /// An encoded frame body we send.
    Outbound(Bytes),
    /// A request we received, decoded, or why it could not be.
    Inbound(std::result::Result<Request, (RemoteStatus, String)>),
}

/// A response frame body (encoded when sent, raw when received: the loop
/// decodes it knowing the peer).
#[derive(Debug)]
pub(crate) struct RrResponse(pub(super) Bytes);

/// Length-prefixed prost frames with limits checked before allocation.
#[derive(Clone, Debug)]
pub(crate) struct MeshCodec {
    pub(super) limits: Limits,
}

impl request_response::Codec for MeshCodec {
    type Protocol = StreamProtocol;
    type Request = RrRequest;
    type Response = RrResponse;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<RrRequest>
    where
        T: AsyncRead + Unpin + Send,
    {
        let limit = self.limits.max_request_bytes;
        let frame = wire::read_frame(io, limit, "request").await?;
        Ok(RrRequest::Inbound(streams::parse_request(frame, limit)))
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<RrResponse>
    where
        T: AsyncRead + Unpin + Send,
    {
        let limit = self.limits.max_response_bytes;
        match wire::read_frame(io, limit, "response").await? {
            Frame::Body(b) => Ok(RrResponse(b)),
            Frame::Oversized { size } => Err(wire::io_error(NetworkError::TooLarge {
                what: "response",
                size,
                limit: limit as u64,
            })),
        }
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: RrRequest,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        match req {
            RrRequest::Outbound(body) => wire::write_frame(io, &body).await,
            RrRequest::Inbound(_) => Err(io::Error::other("an inbound request cannot be sent")),
        }
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: RrResponse,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        wire::write_frame(io, &res.0).await
    }
}
