//! The wire codec: a send request frame and a sync page, encoded and decoded,
//! against copying the same bytes (the floor).

use criterion::{BatchSize, Criterion};
use std::hint::black_box;
use hamgam_proto::frame::{FrameKind, HEADER_BYTES, encode_frame};
use hamgam_proto::{Difference, Message, Request, Response, Update, UpdateKind, codec};
use hamgam_types::{ChatId, UserId};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn persian_text(bytes: usize) -> String {
    let mut text = "سلام دنیا ".repeat(bytes / 10 + 1);
    while text.len() > bytes {
        text.pop();
    }
    text
}

fn sync_page() -> Response {
    let chat = ChatId(0x1234_5678_9abc);
    let updates = (1..=100).map(|pts| Update { pts, kind: UpdateKind::NewMessage { chat, seq: pts } }).collect();
    let messages = (1..=100)
        .map(|seq| Message {
            chat,
            seq,
            sender: UserId(42),
            date_ms: 1_700_000_000_000 + seq,
            text: persian_text(256),
            edit_date_ms: None,
            deleted: false,
        })
        .collect();
    Response::Difference(Difference { updates, messages, pts: 100, more: true })
}

fn benches(c: &mut Criterion) {
    let send = Request::SendMessage { chat: ChatId(0x1234_5678_9abc), client_msg_id: 0xdead_beef, text: persian_text(256) };
    let send_frame = encode_frame(FrameKind::Request, &send).unwrap();
    let page = sync_page();
    let page_frame = encode_frame(FrameKind::Response, &page).unwrap();

    let mut group = c.benchmark_group("codec");
    group.bench_function("baseline_copy_send_frame", |b| {
        b.iter_batched(|| send_frame.clone(), |frame| black_box(frame.to_vec()), BatchSize::SmallInput)
    });
    group.bench_function("encode_send_frame", |b| b.iter(|| encode_frame(FrameKind::Request, black_box(&send)).unwrap()));
    group.bench_function("decode_send_frame", |b| {
        b.iter(|| codec::decode::<Request>(black_box(&send_frame[HEADER_BYTES..])).unwrap())
    });
    group.bench_function("encode_sync_page_100", |b| {
        b.iter(|| encode_frame(FrameKind::Response, black_box(&page)).unwrap())
    });
    group.bench_function("decode_sync_page_100", |b| {
        b.iter(|| codec::decode::<Response>(black_box(&page_frame[HEADER_BYTES..])).unwrap())
    });
    group.finish();
}

fn main() {
    let mut criterion = hamgam_benches::criterion();
    benches(&mut criterion);
    criterion.final_summary();
    hamgam_benches::report_ratios(
        "codec",
        "baseline_copy_send_frame",
        &["encode_send_frame", "decode_send_frame", "encode_sync_page_100", "decode_sync_page_100"],
    );
}
