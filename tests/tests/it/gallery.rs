//! Galleries against a real node: albums seen by visibility, thumbnails
//! made at upload for JPEG and PNG photos only, likes counted once per
//! person, items that outlive the file they were made from, bad input.

use crate::support::Node;
use hamgam_client::{ClientError, ErrorCode, TransferCounters, Visibility};
use rand::{Rng, SeedableRng};
use std::io::Cursor;
use std::path::Path;

fn code<T>(result: Result<T, ClientError>) -> Option<ErrorCode> {
    result.err().and_then(|e| e.code())
}

fn write_photo(path: &Path, format: image::ImageFormat, width: u32, height: u32) -> Vec<u8> {
    let pixels = image::RgbImage::from_fn(width, height, |x, y| image::Rgb([(x * 7 % 256) as u8, (y % 256) as u8, 40]));
    let mut bytes = Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(pixels).write_to(&mut bytes, format).expect("encode");
    std::fs::write(path, bytes.get_ref()).expect("write");
    bytes.into_inner()
}

#[tokio::test(flavor = "multi_thread")]
async fn albums_are_seen_by_visibility_with_thumbnails_and_likes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let node = Node::start(&dir.path().join("node"));
    let (alice, alice_id) = node.user("alice").await;
    let (bob, bob_id) = node.user("bob").await;
    let (carol, _) = node.user("carol").await;
    alice.direct_chat(bob_id).await.expect("alice and bob are contacts");

    let family = alice.create_album("خانواده", Visibility::Private).await.expect("album");
    let trip = alice.create_album("سفر شمال", Visibility::Contacts).await.expect("album");
    let public = alice.create_album("عمومی", Visibility::Public).await.expect("album");
    let counters = TransferCounters::default();
    let jpeg = dir.path().join("sea.jpg");
    let jpeg_bytes = write_photo(&jpeg, image::ImageFormat::Jpeg, 1200, 800);
    let png = dir.path().join("map.png");
    write_photo(&png, image::ImageFormat::Png, 600, 900);
    let video = dir.path().join("clip.mp4");
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut video_bytes = vec![0u8; 2 << 20];
    rng.fill(&mut video_bytes[..]);
    std::fs::write(&video, &video_bytes).expect("write");
    let photo_item = alice.add_to_album(public.album, &jpeg, "/گالری/sea.jpg", &counters).await.expect("add");
    alice.add_to_album(public.album, &png, "/گالری/map.png", &counters).await.expect("add");
    alice.add_to_album(public.album, &video, "/گالری/clip.mp4", &counters).await.expect("add");
    alice.add_stored_to_album(trip.album, "/گالری/sea.jpg", None).await.expect("add a stored file");
    alice.add_stored_to_album(family.album, "/گالری/map.png", None).await.expect("add a stored file");

    // Who sees which albums.
    let titles = |albums: Vec<hamgam_client::AlbumInfo>| albums.into_iter().map(|a| a.title).collect::<Vec<_>>();
    let mut seen = titles(alice.albums(alice_id, None, 10).await.expect("list").0);
    seen.sort();
    assert_eq!(seen, ["خانواده", "سفر شمال", "عمومی"]);
    let mut seen = titles(bob.albums(alice_id, None, 10).await.expect("list").0);
    seen.sort();
    assert_eq!(seen, ["سفر شمال", "عمومی"], "a contact sees contacts and public albums");
    assert_eq!(titles(carol.albums(alice_id, None, 10).await.expect("list").0), ["عمومی"]);
    assert_eq!(code(carol.album_items(alice_id, trip.album, None, 10).await), Some(ErrorCode::NOT_FOUND));
    assert_eq!(code(bob.album_items(alice_id, family.album, None, 10).await), Some(ErrorCode::NOT_FOUND));

    // Thumbnails for the JPEG and the PNG, none for the video.
    let (items, more) = carol.album_items(alice_id, public.album, None, 10).await.expect("items");
    assert!(!more);
    let names: Vec<&str> = items.iter().map(|i| i.file.name.as_str()).collect();
    assert_eq!(names, ["sea.jpg", "map.png", "clip.mp4"]);
    assert!(items[2].thumbnail.is_none());
    for (item, size) in items[..2].iter().zip([(320, 213), (213, 320)]) {
        let thumbnail = carol.thumbnail(item.thumbnail.as_ref().expect("a thumbnail")).await.expect("fetch");
        let decoded = image::load_from_memory_with_format(&thumbnail, image::ImageFormat::Jpeg).expect("a JPEG");
        assert_eq!((decoded.width(), decoded.height()), size, "{}", item.file.name);
    }

    // Likes: once per person, undone, shown to the liker.
    assert_eq!(bob.like(alice_id, public.album, photo_item, true).await.expect("like"), 1);
    assert_eq!(bob.like(alice_id, public.album, photo_item, true).await.expect("again"), 1);
    assert_eq!(carol.like(alice_id, public.album, photo_item, true).await.expect("like"), 2);
    assert_eq!(carol.like(alice_id, public.album, photo_item, false).await.expect("unlike"), 1);
    let (items, _) = bob.album_items(alice_id, public.album, None, 10).await.expect("items");
    assert!(items[0].liked && items[0].likes == 1);
    assert_eq!(code(carol.like(alice_id, trip.album, 1, true).await), Some(ErrorCode::NOT_FOUND));

    // An item outlives the file it was made from, and reads back whole.
    alice.delete_path("/گالری/sea.jpg").await.expect("delete the stored file");
    let mut out = Vec::new();
    bob.download_shared(&items[0].file, None, &mut out, &counters).await.expect("download");
    assert_eq!(out, jpeg_bytes);

    // Visibility changes take effect; an album is deleted only when empty.
    alice.set_album_visibility(trip.album, Visibility::Public).await.expect("make public");
    assert_eq!(carol.albums(alice_id, None, 10).await.expect("list").0.len(), 2);
    assert_eq!(code(alice.delete_album(family.album).await), Some(ErrorCode::CONFLICT));
    alice.remove_from_album(family.album, 1).await.expect("remove");
    alice.delete_album(family.album).await.expect("delete the empty album");
    assert_eq!(code(bob.set_album_visibility(public.album, Visibility::Private).await), Some(ErrorCode::NOT_FOUND));

    // Bad input.
    let long_title = "ع".repeat(hamgam_types::limits::ALBUM_TITLE_CHARS_MAX + 1);
    assert_eq!(code(alice.create_album(&long_title, Visibility::Public).await), Some(ErrorCode::INVALID_ARGUMENT));
    assert_eq!(code(alice.add_stored_to_album(public.album, "/nothing.jpg", None).await), Some(ErrorCode::NOT_FOUND));
    let unstored = hamgam_proto::store::ChunkRef { id: hamgam_types::ChunkId([9; 32]), len: 100 };
    let added = alice.add_stored_to_album(public.album, "/گالری/map.png", Some(unstored)).await;
    assert_eq!(code(added), Some(ErrorCode::CHUNKS_MISSING));
}
