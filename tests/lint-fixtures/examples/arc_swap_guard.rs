//! BAD: an arc-swap `Guard` held across an `.await`.
use arc_swap::ArcSwap;

async fn handler(table: &ArcSwap<u32>) -> u32 {
    let snapshot = table.load();
    tokio::task::yield_now().await;
    **snapshot
}

fn main() {
    let table = ArcSwap::from_pointee(1);
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    println!("{}", rt.block_on(handler(&table)));
}
