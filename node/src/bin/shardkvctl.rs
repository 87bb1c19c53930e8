//! `shardkvctl`: the command-line client. Exit status: 0 on success, 1 when
//! `get` finds no such key, 2 on any other failure (with one line on stderr).

use std::ffi::OsString;
use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::{Parser, Subcommand};
use shardkv::replica::members::MembersAdmin;
use shardkv::shardkv::clerk::{Clerk, ClerkOptions};
use shardkv::shardkv::key_to_shard;
use shardkv::shardmaster::Config;

#[derive(Parser)]
#[command(
    name = "shardkvctl",
    version,
    about = "Read and write shardkv, and manage its groups"
)]
struct Cli {
    /// The shardmaster replicas, host:port, comma-separated (every command
    /// but `health` needs them).
    #[arg(long, env = "SHARDKV_MASTERS", value_delimiter = ',')]
    masters: Vec<String>,
    /// Give up after this many seconds.
    #[arg(long, env = "SHARDKV_TIMEOUT", default_value_t = 10.0)]
    timeout: f64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a key's value.
    Get { key: OsString },
    /// Set a key (VALUE `-` reads it from stdin).
    Put { key: OsString, value: OsString },
    /// Append to a key's value (VALUE `-` reads it from stdin).
    Append { key: OsString, value: OsString },
    /// Store hash(previous + VALUE) and print the previous value.
    Puthash { key: OsString, value: OsString },
    /// Remove a key.
    Delete { key: OsString },
    /// Print the shard a key belongs to.
    Shard { key: OsString },
    /// Add a replica group with its servers (host:port,...).
    Join { gid: u64, servers: String },
    /// Remove a replica group; its shards move to the others.
    Leave { gid: u64 },
    /// Assign one shard to a group.
    Move { shard: u64, gid: u64 },
    /// Print configuration NUM (default: the latest) as JSON.
    Query { num: Option<u64> },
    /// Exit 0 if the node at ADDR (host:port) reports SERVING on the gRPC
    /// health service: a readiness probe.
    Health { addr: String },
    /// List, add or remove the members of a replica group (GROUP: a gid,
    /// or `master` for the shardmaster's own group).
    Member {
        #[command(subcommand)]
        action: MemberCommand,
    },
}

#[derive(Subcommand)]
enum MemberCommand {
    /// Print each member: id, address, role, incarnation, and how far
    /// behind the leader it is.
    List { group: String },
    /// Add the replica at ADDR (a node started with `--join`): as a learner,
    /// then as a voter once it has caught up.
    Add { group: String, addr: String },
    /// Remove the member at ADDR from the group.
    Remove { group: String, addr: String },
}

fn bytes_of(arg: OsString) -> Bytes {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStringExt;
        Bytes::from(arg.into_vec())
    }
    #[cfg(not(unix))]
    {
        Bytes::from(arg.to_string_lossy().into_owned())
    }
}

fn value_of(arg: OsString) -> anyhow::Result<Bytes> {
    if arg == "-" {
        let mut buf = Vec::new();
        std::io::stdin().read_to_end(&mut buf)?;
        Ok(Bytes::from(buf))
    } else {
        Ok(bytes_of(arg))
    }
}

fn config_json(config: &Config) -> serde_json::Value {
    let groups: serde_json::Map<String, serde_json::Value> = config
        .groups
        .iter()
        .map(|(gid, servers)| (gid.to_string(), serde_json::json!(servers)))
        .collect();
    serde_json::json!({"num": config.num, "shards": config.shards, "groups": groups})
}

fn print_line(bytes: &[u8]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}

enum Outcome {
    Done,
    NotFound,
}

async fn run(cli: Cli) -> anyhow::Result<Outcome> {
    if !(cli.timeout > 0.0 && cli.timeout.is_finite()) {
        anyhow::bail!("--timeout must be a positive number of seconds");
    }
    let options = ClerkOptions {
        timeout: Duration::from_secs_f64(cli.timeout),
        ..Default::default()
    };
    if let Command::Health { addr } = &cli.command {
        return health(addr, options.timeout).await;
    }
    if cli.masters.is_empty() {
        anyhow::bail!("--masters (or SHARDKV_MASTERS) is required");
    }
    let timeout = options.timeout;
    let clerk = Clerk::new(&cli.masters, options)?;
    match cli.command {
        Command::Member { action } => {
            member(&clerk, &cli.masters, action, timeout).await?;
        }
        Command::Get { key } => match clerk.get(bytes_of(key)).await? {
            Some(value) => print_line(&value)?,
            None => return Ok(Outcome::NotFound),
        },
        Command::Put { key, value } => clerk.put(bytes_of(key), value_of(value)?).await?,
        Command::Append { key, value } => clerk.append(bytes_of(key), value_of(value)?).await?,
        Command::Puthash { key, value } => {
            let previous = clerk.put_hash(bytes_of(key), value_of(value)?).await?;
            print_line(&previous)?;
        }
        Command::Delete { key } => clerk.delete(bytes_of(key)).await?,
        Command::Shard { key } => {
            let config = clerk.masters().query(None).await?;
            print_line(
                key_to_shard(&bytes_of(key), config.shards.len())
                    .to_string()
                    .as_bytes(),
            )?;
        }
        Command::Join { gid, servers } => {
            let servers: Vec<String> = servers
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
            clerk.masters().join(gid, servers).await?;
        }
        Command::Leave { gid } => {
            clerk.masters().leave(gid).await?;
        }
        Command::Move { shard, gid } => {
            clerk.masters().r#move(shard, gid).await?;
        }
        Command::Query { num } => {
            let config = clerk.masters().query(num).await?;
            print_line(config_json(&config).to_string().as_bytes())?;
        }
        Command::Health { .. } => unreachable!("answered above"),
    }
    Ok(Outcome::Done)
}

/// `member list|add|remove`.
async fn member(
    clerk: &Clerk,
    masters: &[String],
    action: MemberCommand,
    timeout: Duration,
) -> anyhow::Result<()> {
    let group = match &action {
        MemberCommand::List { group }
        | MemberCommand::Add { group, .. }
        | MemberCommand::Remove { group, .. } => group.clone(),
    };
    let (name, servers) = if group == "master" {
        ("shardmaster".to_string(), masters.to_vec())
    } else {
        let gid: u64 = group
            .parse()
            .map_err(|_| anyhow::anyhow!("GROUP is a gid (a number) or `master`, not {group:?}"))?;
        let config = clerk.masters().query(None).await?;
        let Some(servers) = config.groups.get(&gid) else {
            anyhow::bail!(
                "group {gid} is not in the latest configuration ({})",
                config.num
            );
        };
        (format!("kv-{gid}"), servers.clone())
    };
    let admin = MembersAdmin::new(servers, Duration::from_secs(5));
    let deadline = tokio::time::Instant::now() + timeout;
    let members = match action {
        MemberCommand::List { .. } => admin.list().await,
        MemberCommand::Add { addr, .. } => admin.add(&addr, &name, deadline).await,
        MemberCommand::Remove { addr, .. } => admin.remove(&addr, deadline).await,
    }
    .map_err(|e| anyhow::anyhow!(e))?;
    let mut out = format!(
        "epoch {}\nID  ADDRESS  ROLE  INCARNATION  BEHIND\n",
        members.epoch
    );
    for m in &members.members {
        let role = if members.has_leader && m.id == members.leader {
            "leader"
        } else if m.voter {
            "voter"
        } else {
            "learner"
        };
        let behind = if m.has_progress {
            m.behind_slots.to_string()
        } else {
            "?".to_string()
        };
        out.push_str(&format!(
            "{}  {}  {role}  {}  {behind}\n",
            m.id, m.address, m.incarnation
        ));
    }
    print_line(out.trim_end().as_bytes())?;
    Ok(())
}

async fn health(addr: &str, timeout: Duration) -> anyhow::Result<Outcome> {
    shardkv::daemon::probe::check_serving(addr, timeout).await?;
    Ok(Outcome::Done)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(Outcome::Done) => ExitCode::SUCCESS,
        Ok(Outcome::NotFound) => {
            eprintln!("not found");
            ExitCode::from(1)
        }
        Err(e) => {
            // One line: the chain of causes, joined.
            eprintln!("shardkvctl: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::from(2)
        }
    }
}
