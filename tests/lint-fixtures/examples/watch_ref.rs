//! BAD: a `watch` read guard held across an `.await` (the only writer blocks meanwhile).
use tokio::sync::watch;

async fn handler(rx: &watch::Receiver<u32>) -> u32 {
    let table = rx.borrow();
    tokio::task::yield_now().await;
    *table
}

fn main() {
    let (_tx, rx) = watch::channel(1);
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    println!("{}", rt.block_on(handler(&rx)));
}
