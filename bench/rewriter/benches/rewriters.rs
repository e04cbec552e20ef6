//! Criterion benchmarks of the adapter's streaming rewriters, in bytes/s:
//!   html/*     HtmlRewriter (lol_html + the adapter's handlers) vs. lol_html with
//!              no handlers (the floor: parsing and serialising only) and with
//!              one do-nothing `*` element handler (the floor for anything that
//!              reads attributes: every start tag is fully lexed), and the
//!              prototypes of src/proto.rs (same output, suggested changes)
//!   literal/*  LiteralRewriter (MLflow's "/#" route literals) on the real main
//!              bundle vs. copying the same chunks (the floor)
//! Every iteration builds a new rewriter, as the proxy does per response, and
//! feeds the document in 16 KiB chunks.

use adapter::Prefix;
use adapter::rewrite::StreamRewriter;
use adapter::rewrite::html::HtmlRewriter;
use adapter::rewrite::literal::{LiteralRewriter, LiteralSet};
use bytes::BytesMut;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use flowgate_rewriter_bench::proto::{Handlers, ProtoRewriter, Sink};
use flowgate_rewriter_bench::{CHUNK, PREFIX, corpus_file, links_page};
use std::hint::black_box;
use std::sync::Arc;

fn run_stream(r: &mut dyn StreamRewriter, input: &[u8]) -> usize {
    let mut n = 0;
    for chunk in input.chunks(CHUNK) {
        n += r.feed(chunk).expect("feed").len();
    }
    n + r.finish().expect("finish").len()
}

fn lol_noop(input: &[u8], out: &mut Vec<u8>) -> usize {
    out.clear();
    let mut rw = lol_html::HtmlRewriter::new(lol_html::Settings::new(), |c: &[u8]| {
        out.extend_from_slice(c)
    });
    for chunk in input.chunks(CHUNK) {
        rw.write(chunk).expect("write");
    }
    rw.end().expect("end");
    out.len()
}

fn lol_star(input: &[u8], out: &mut Vec<u8>) -> usize {
    out.clear();
    let mut rw = lol_html::HtmlRewriter::new(
        lol_html::Settings::new().append_element_content_handler(lol_html::element!("*", |_el| Ok(()))),
        |c: &[u8]| out.extend_from_slice(c),
    );
    for chunk in input.chunks(CHUNK) {
        rw.write(chunk).expect("write");
    }
    rw.end().expect("end");
    out.len()
}

fn collect(r: &mut dyn StreamRewriter, input: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in input.chunks(CHUNK) {
        out.extend_from_slice(&r.feed(chunk).expect("feed"));
    }
    out.extend_from_slice(&r.finish().expect("finish"));
    out
}

const PROTOS: [(&str, Sink, Handlers); 3] = [
    ("proto-tls-sink", Sink::ThreadLocal, Handlers::PerAttribute),
    ("proto-one-handler", Sink::Mutex, Handlers::One),
    ("proto-both", Sink::ThreadLocal, Handlers::One),
];

fn html_inputs() -> Vec<(String, Vec<u8>)> {
    let mut v = Vec::new();
    if let Some((_, b)) = corpus_file("index") {
        v.push(("mlflow-index.html".to_owned(), b));
    } else {
        eprintln!("bench: no corpus (run bench/capture): skipping MLflow index.html");
    }
    if let Some((_, b)) = corpus_file("links") {
        v.push(("links-128KiB.html".to_owned(), b));
    }
    v.push(("links-10MB.html".to_owned(), links_page(10_000_000)));
    v
}

fn html(c: &mut Criterion) {
    let prefix = Prefix::new(PREFIX).expect("prefix");
    let mut g = c.benchmark_group("html");
    for (name, input) in html_inputs() {
        // It really rewrites, and the prototypes give the adapter's output.
        let want = collect(&mut HtmlRewriter::new(prefix.clone(), Some("text/html; charset=utf-8")), &input);
        assert!(want.len() >= input.len());
        for (proto, sink, handlers) in PROTOS {
            let got = collect(&mut ProtoRewriter::new(prefix.clone(), sink, handlers), &input);
            assert!(got == want, "{proto} differs from the adapter on {name}");
        }
        g.throughput(Throughput::Bytes(input.len() as u64));
        if input.len() > 1_000_000 {
            g.sample_size(20);
        } else {
            g.sample_size(100);
        }
        g.bench_with_input(BenchmarkId::new("adapter", &name), &input, |b, input| {
            b.iter(|| {
                let mut r = HtmlRewriter::new(prefix.clone(), Some("text/html; charset=utf-8"));
                black_box(run_stream(&mut r, black_box(input)))
            })
        });
        let mut buf = Vec::with_capacity(input.len() * 2);
        g.bench_with_input(BenchmarkId::new("lol_html-noop", &name), &input, |b, input| {
            b.iter(|| black_box(lol_noop(black_box(input), &mut buf)))
        });
        g.bench_with_input(BenchmarkId::new("lol_html-star-noop", &name), &input, |b, input| {
            b.iter(|| black_box(lol_star(black_box(input), &mut buf)))
        });
        for (proto, sink, handlers) in PROTOS {
            g.bench_with_input(BenchmarkId::new(proto, &name), &input, |b, input| {
                b.iter(|| {
                    let mut r = ProtoRewriter::new(prefix.clone(), sink, handlers);
                    black_box(run_stream(&mut r, black_box(input)))
                })
            });
        }
    }
    g.finish();
}

fn literal(c: &mut Criterion) {
    let Some((name, bundle)) = corpus_file("bundle") else {
        eprintln!("bench: no corpus (run bench/capture): skipping the MLflow bundle");
        return;
    };
    let name = name.rsplit('/').next().unwrap_or(&name).to_owned();
    let set = Arc::new(LiteralSet::mlflow_hash_routes(PREFIX));
    let mut g = c.benchmark_group("literal");
    g.throughput(Throughput::Bytes(bundle.len() as u64));
    g.sample_size(30);
    g.bench_with_input(BenchmarkId::new("adapter", &name), &bundle, |b, input| {
        b.iter(|| {
            let mut r = LiteralRewriter::new(Arc::clone(&set));
            black_box(run_stream(&mut r, black_box(input)))
        })
    });
    g.bench_with_input(BenchmarkId::new("copy", &name), &bundle, |b, input| {
        b.iter(|| {
            let mut n = 0;
            for chunk in black_box(input).chunks(CHUNK) {
                let mut out = BytesMut::with_capacity(chunk.len() + 64);
                out.extend_from_slice(chunk);
                n += black_box(out.freeze()).len();
            }
            n
        })
    });
    g.finish();
}

criterion_group!(benches, html, literal);
criterion_main!(benches);
