//! GOOD: the same handlers, copying out what they need and dropping every guard before the
//! `.await`, as the router does.
use arc_swap::ArcSwap;
use dashmap::DashMap;
use tokio::sync::watch;

async fn handler(map: &DashMap<u32, u32>, rx: &watch::Receiver<u32>, table: &ArcSwap<u32>) -> u32 {
    let v = map.get(&1).map(|g| *g).unwrap_or(0);
    let w = *rx.borrow();
    let t = **table.load();
    tokio::task::yield_now().await;
    v + w + t
}

fn main() {
    let map = DashMap::new();
    map.insert(1, 2);
    let (_tx, rx) = watch::channel(1);
    let table = ArcSwap::from_pointee(1);
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    println!("{}", rt.block_on(handler(&map, &rx, &table)));
}
