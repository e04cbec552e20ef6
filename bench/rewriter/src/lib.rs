//! Inputs for the rewriter benchmarks: the MLflow bytes captured by
//! `bench/capture` (bench/.corpus) and a generated HTML page with many links.

pub mod proto;

use std::path::PathBuf;

/// The instance prefix used throughout the benchmarks.
pub const PREFIX: &str = "/k3x9q2a";

/// Chunk size the rewriters are fed with (what a proxy typically gets per
/// body frame from a local upstream).
pub const CHUNK: usize = 16 * 1024;

fn corpus_dir() -> PathBuf {
    std::env::var_os("FLOWGATE_BENCH_CORPUS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.corpus"))
}

/// A file of the captured corpus by its manifest key (`bundle`, `index`,
/// `links`, `css`, ...), or `None` when the corpus has not been captured.
pub fn corpus_file(key: &str) -> Option<(String, Vec<u8>)> {
    let dir = corpus_dir();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).ok()?).ok()?;
    let rel = manifest["files"][key]["file"].as_str()?.to_owned();
    let bytes = std::fs::read(dir.join("www").join(&rel)).ok()?;
    Some((rel, bytes))
}

/// A deterministic HTML page of about `size` bytes: a table of runs, each row
/// with a root-relative link, an image, a relative link and some text, as a
/// long listing page would have (every third row also has a srcset and an
/// inline style, which the adapter rewrites too).
pub fn links_page(size: usize) -> Vec<u8> {
    let mut out = String::with_capacity(size + 1024);
    out.push_str(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"/><title>runs</title>\
         <link rel=\"stylesheet\" href=\"/static-files/static/css/main.css\"/>\
         <script defer src=\"/static-files/static/js/main.js\"></script></head><body><table>\n",
    );
    let mut i = 0u64;
    while out.len() < size {
        out.push_str(&format!(
            "<tr class=\"run\"><td><a href=\"/#/experiments/1/runs/{i:032x}\">run {i}</a></td>\
             <td><img src=\"/get-artifact?path=plots/{i}.png&amp;run_uuid={i:032x}\" alt=\"plot {i}\"/></td>\
             <td><a href=\"details/{i}\">details</a> accuracy {:.4}</td>",
            0.5 + (i % 97) as f64 / 200.0
        ));
        if i % 3 == 0 {
            out.push_str(&format!(
                "<td style=\"background:url(/static-files/bg.png)\"><img srcset=\"/t/{i}.png 1x, /t/{i}@2x.png 2x\"/></td>"
            ));
        }
        out.push_str("</tr>\n");
        i += 1;
    }
    out.push_str("</table></body></html>\n");
    out.into_bytes()
}
