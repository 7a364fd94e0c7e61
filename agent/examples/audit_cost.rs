use tollgate::audit::{AuditLog, Kind, Record};
fn main() {
    let dir = tempfile::tempdir().unwrap();
    let (log, th) = AuditLog::open(dir.path()).unwrap();
    let mut base = Record::new(Kind::StatementResult);
    base.identity = Some("planner-bot".into());
    base.pid = Some(12345);
    base.tgid = Some(12345);
    base.uid = Some(0);
    base.gid = Some(0);
    base.comm = Some("pgbench".into());
    base.exe = Some("/usr/lib/postgresql/15/bin/pgbench".into());
    base.cgroup = Some("/tollgate-bench/planner".into());
    base.destination = Some("127.0.0.1:5432".into());
    base.resource = Some("bench-db".into());
    base.database = Some("postgres".into());
    base.db_user = Some("app".into());
    base.session = Some(7);
    let n = 200_000;
    let t = std::time::Instant::now();
    for i in 0..n {
        let mut r = base.clone();
        r.refs = Some(vec![i]);
        r.count = Some(1);
        r.duration_ms = Some(0);
        r.detail = Some("1 commands".into());
        log.append(r);
    }
    let queued = t.elapsed();
    drop(log);
    th.join();
    println!("enqueue {:.2} us/record, total {:.2} us/record", queued.as_secs_f64() * 1e6 / n as f64, t.elapsed().as_secs_f64() * 1e6 / n as f64);
}
