//! BAD: a dashmap shard guard held across an `.await`.
use dashmap::DashMap;

async fn handler(map: &DashMap<u32, u32>) -> u32 {
    let guard = map.get(&1).expect("present");
    tokio::task::yield_now().await;
    *guard
}

fn main() {
    let map = DashMap::new();
    map.insert(1, 2);
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    println!("{}", rt.block_on(handler(&map)));
}
