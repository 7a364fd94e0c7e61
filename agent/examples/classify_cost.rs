fn main() {
    let q = "SELECT abalance FROM pgbench_accounts WHERE aid = 56789;";
    let n = 20000;
    let t = std::time::Instant::now();
    for i in 0..n {
        let s = q.replace("56789", &i.to_string());
        std::hint::black_box(tollgate::sql::classify(&s));
    }
    println!("classify: {:.1} us", t.elapsed().as_secs_f64() * 1e6 / n as f64);
    let t = std::time::Instant::now();
    for i in 0..n {
        let s = q.replace("56789", &i.to_string());
        std::hint::black_box(pg_query::parse(&s).unwrap());
    }
    println!("parse only: {:.1} us", t.elapsed().as_secs_f64() * 1e6 / n as f64);
    let t = std::time::Instant::now();
    for i in 0..n {
        let s = q.replace("56789", &i.to_string());
        std::hint::black_box(pg_query::scan(&s).unwrap());
    }
    println!("scan only: {:.1} us", t.elapsed().as_secs_f64() * 1e6 / n as f64);
}
