//! Galleries from the client's side: albums, items with thumbnails made
//! here at upload (JPEG and PNG photos), listing others' albums, likes.
//!
//! A thumbnail is a JPEG at most `THUMBNAIL_SIDE_MAX` pixels a side, made
//! from the local file while it is being stored, and stored as one chunk:
//! a viewer scrolling an album fetches a few KiB per photo, and the same
//! photo in ten albums has one thumbnail.

use crate::{Client, ClientError, TransferCounters};
use hamgam_blob::StoredChunk;
use hamgam_proto::store::{AlbumInfo, AlbumItem, ChunkRef, Visibility};
use hamgam_proto::{Request, Response};
use hamgam_types::{UserId, limits};
use std::io::Cursor;

/// Quality of thumbnails' JPEG encoding: small, and fine at their size.
const THUMBNAIL_JPEG_QUALITY: u8 = 80;
/// Photos larger than this (decoded, in bytes) get no thumbnail rather
/// than a decoder holding that much memory.
const THUMBNAIL_DECODE_BYTES_MAX: u64 = 512 << 20;

/// A JPEG thumbnail of a JPEG or PNG photo, or `None` for anything else
/// (videos, documents) and for images that do not decode.
pub fn make_thumbnail(bytes: &[u8]) -> Option<Vec<u8>> {
    let format = image::guess_format(bytes).ok()?;
    if !matches!(format, image::ImageFormat::Jpeg | image::ImageFormat::Png) {
        return None;
    }
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), format);
    let mut bounds = image::Limits::default();
    bounds.max_alloc = Some(THUMBNAIL_DECODE_BYTES_MAX);
    reader.limits(bounds);
    let photo = reader.decode().ok()?;
    let side = limits::THUMBNAIL_SIDE_MAX;
    let small = image::DynamicImage::ImageRgb8(photo.thumbnail(side, side).to_rgb8());
    let mut out = Vec::new();
    let encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, THUMBNAIL_JPEG_QUALITY);
    small.write_with_encoder(encoder).ok()?;
    Some(out)
}

/// [`make_thumbnail`] of a local file, read whole only if its first
/// bytes say it is a JPEG or PNG photo (a video is not read again).
fn thumbnail_of_file(path: &std::path::Path) -> Result<Option<Vec<u8>>, ClientError> {
    use std::io::Read;
    let io = |e| ClientError::Io { path: path.display().to_string(), source: e };
    let mut head = Vec::with_capacity(16);
    std::fs::File::open(path).map_err(io)?.take(16).read_to_end(&mut head).map_err(io)?;
    if !matches!(image::guess_format(&head), Ok(image::ImageFormat::Jpeg | image::ImageFormat::Png)) {
        return Ok(None);
    }
    Ok(make_thumbnail(&std::fs::read(path).map_err(io)?))
}

impl Client {
    /// A new album (`client_ref` makes a retry find the same album).
    pub async fn create_album(&self, title: &str, visibility: Visibility) -> Result<AlbumInfo, ClientError> {
        use rand::RngCore;
        let request = Request::CreateAlbum { title: title.into(), visibility, client_ref: rand::rng().next_u64() };
        expect!(self.call(&request).await?, Response::Album(info) => info)
    }

    pub async fn set_album_visibility(&self, album: u64, visibility: Visibility) -> Result<(), ClientError> {
        self.done(Request::SetAlbumVisibility { album, visibility }).await
    }

    /// Stores the local photo or video at `remote` (sending only missing
    /// chunks), makes and stores its thumbnail if it is a JPEG or PNG
    /// photo, and adds it to `album`. Returns the item's id.
    pub async fn add_to_album(
        &self,
        album: u64,
        local: &std::path::Path,
        remote: &str,
        counters: &TransferCounters,
    ) -> Result<u64, ClientError> {
        self.upload_file(local, remote, counters).await?;
        let path = local.to_path_buf();
        let made = tokio::task::spawn_blocking(move || thumbnail_of_file(&path))
            .await
            .map_err(|e| ClientError::Protocol(format!("making a thumbnail failed: {e}")))??;
        let thumbnail = match made {
            Some(jpeg) => Some(self.store_thumbnail(&jpeg).await?),
            None => None,
        };
        self.add_stored_to_album(album, remote, thumbnail).await
    }

    /// Adds a file already in the caller's store to `album`.
    pub async fn add_stored_to_album(
        &self,
        album: u64,
        remote: &str,
        thumbnail: Option<ChunkRef>,
    ) -> Result<u64, ClientError> {
        let request = Request::AddToAlbum { album, path: remote.into(), thumbnail };
        expect!(self.call(&request).await?, Response::AlbumItemAdded { item } => item)
    }

    async fn store_thumbnail(&self, jpeg: &[u8]) -> Result<ChunkRef, ClientError> {
        if jpeg.len() > limits::CHUNK_MAX_BYTES as usize {
            return Err(ClientError::Protocol("a thumbnail came out larger than a chunk".into()));
        }
        let chunk = StoredChunk::seal(jpeg);
        let id = chunk.id;
        if !self.missing_chunks(&[id]).await?.is_empty() {
            self.put_chunks(vec![chunk]).await?;
        }
        Ok(ChunkRef { id, len: jpeg.len() as u32 })
    }

    pub async fn remove_from_album(&self, album: u64, item: u64) -> Result<(), ClientError> {
        self.done(Request::RemoveFromAlbum { album, item }).await
    }

    pub async fn delete_album(&self, album: u64) -> Result<(), ClientError> {
        self.done(Request::DeleteAlbum { album }).await
    }

    /// `owner`'s albums the caller may see, one page.
    pub async fn albums(
        &self,
        owner: UserId,
        after: Option<u64>,
        limit: u32,
    ) -> Result<(Vec<AlbumInfo>, bool), ClientError> {
        let request = Request::ListAlbums { owner, after, limit };
        expect!(self.call(&request).await?, Response::Albums { albums, more } => (albums, more))
    }

    /// One page of an album's items.
    pub async fn album_items(
        &self,
        owner: UserId,
        album: u64,
        after: Option<u64>,
        limit: u32,
    ) -> Result<(Vec<AlbumItem>, bool), ClientError> {
        let request = Request::ListAlbumItems { owner, album, after, limit };
        expect!(self.call(&request).await?, Response::AlbumItems { items, more } => (items, more))
    }

    /// Likes (or unlikes) an item; returns its likes after.
    pub async fn like(&self, owner: UserId, album: u64, item: u64, like: bool) -> Result<u64, ClientError> {
        let request = Request::LikeItem { owner, album, item, like };
        expect!(self.call(&request).await?, Response::Likes { count } => count)
    }

    /// An item's thumbnail (JPEG bytes), checked against its name.
    pub async fn thumbnail(&self, thumbnail: &ChunkRef) -> Result<Vec<u8>, ClientError> {
        let mut plains = self.fetch_plain(std::slice::from_ref(thumbnail)).await?;
        plains.pop().ok_or_else(|| ClientError::Protocol("the thumbnail was not returned".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn photo(format: image::ImageFormat, width: u32, height: u32) -> Vec<u8> {
        let pixels = image::RgbImage::from_fn(width, height, |x, y| image::Rgb([(x % 256) as u8, (y % 256) as u8, 90]));
        let mut out = Cursor::new(Vec::new());
        image::DynamicImage::ImageRgb8(pixels).write_to(&mut out, format).expect("encode");
        out.into_inner()
    }

    #[test]
    fn jpeg_and_png_photos_get_small_jpeg_thumbnails_and_nothing_else_does() {
        for format in [image::ImageFormat::Jpeg, image::ImageFormat::Png] {
            let thumbnail = make_thumbnail(&photo(format, 1600, 900)).expect("a thumbnail");
            let decoded = image::load_from_memory(&thumbnail).expect("decodes");
            assert_eq!(image::guess_format(&thumbnail).ok(), Some(image::ImageFormat::Jpeg));
            assert_eq!((decoded.width(), decoded.height()), (320, 180), "{format:?}: aspect kept, longest side 320");
            assert!(thumbnail.len() < 64 << 10);
        }
        assert!(make_thumbnail(b"\x00\x00\x00\x18ftypmp42 a video").is_none());
        let mut broken = photo(image::ImageFormat::Png, 50, 50);
        broken.truncate(40);
        assert!(make_thumbnail(&broken).is_none(), "a damaged photo gets no thumbnail, not a panic");
    }
}
