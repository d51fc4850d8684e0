//! The swarm demo: `cargo run --release -p colony-examples --bin demo`.
//!
//! Four peers in one process train the example MLP together over loopback QUIC until the validation
//! accuracy reaches the target, with a progress bar per peer, a final table, and a loss-curve PNG. It needs
//! no network beyond loopback and no services.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use colony::membership::MembershipConfig;
use colony::peer::{TrainingPeer, start_training_peer};
use colony_examples::swarm::{Event, Summary, TrainFlags, tensor_infos, train};
use colony_examples::{Mlp, Series, generate, plot_loss_curves};
use colony_transports::{Address, Keypair};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

#[derive(Debug, Parser)]
#[command(about = "Colony's swarm demo: peers in one process train an MLP together over loopback")]
struct Args {
    /// Peers in the swarm.
    #[arg(long, default_value_t = 4)]
    peers: usize,
    /// Transport between the peers: quic or tcp (loopback).
    #[arg(long, default_value = "quic")]
    transport: String,
    /// Where to write the loss curves.
    #[arg(long, default_value = "colony-demo-loss.png")]
    plot: PathBuf,
    /// Threads of the async runtime that carries the peers' networking.
    #[arg(long, default_value_t = 2)]
    io_threads: usize,
    #[command(flatten)]
    flags: TrainFlags,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.peers >= 1, "--peers must be at least 1");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.io_threads.max(1))
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let data_spec = args.flags.data_spec();
    let (train_set, validation) = generate(&data_spec);
    let (train_set, validation) = (Arc::new(train_set), Arc::new(validation));
    let model_spec = args.flags.model_spec(&data_spec);
    let model = Mlp::new(&model_spec)?;
    let tensors = tensor_infos(&model);
    let options = args.flags.options(&tensors)?;
    let target_batch_size = options.target_batch_size;
    println!(
        "Colony demo: {} peers over loopback {}, an MLP of {} parameters, target batch {} (batches of {}), until \
         {:.0} % validation accuracy or epoch {}",
        args.peers,
        args.transport,
        model.num_params(),
        options.target_batch_size,
        options.batch_size_per_step.unwrap_or_default(),
        args.flags.target_accuracy * 100.0,
        args.flags.max_epochs
    );

    let mut peers: Vec<TrainingPeer> = Vec::new();
    let mut bootstrap: Option<Address> = None;
    for _ in 0..args.peers {
        let listen: Address = format!("{}://127.0.0.1:0", args.transport)
            .parse()
            .with_context(|| format!("--transport {}", args.transport))?;
        let mut config = MembershipConfig::new("colony-demo", Some(listen));
        config.initial_peers = bootstrap.iter().cloned().collect();
        let initial = model.params();
        let peer = runtime
            .block_on(start_training_peer(
                config,
                Keypair::generate(),
                None,
                tensors.clone(),
                &initial,
                options.clone(),
            ))
            .map_err(anyhow::Error::msg)?;
        if bootstrap.is_none() {
            bootstrap = peer.membership.address();
        }
        peers.push(peer);
    }
    let joined = Instant::now();
    while !peers.iter().all(|p| p.membership.members().len() + 1 == args.peers) {
        anyhow::ensure!(
            joined.elapsed() < Duration::from_secs(30),
            "the peers did not find each other in 30 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let bars = MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:>7} [{bar:32.cyan/blue}] {pos:>6}/{len:6} {msg}")
        .context("the progress bar template")?
        .progress_chars("=> ");
    let stop = Arc::new(AtomicBool::new(false));
    let (events, received) = mpsc::channel::<(usize, Event)>();
    let started = Instant::now();
    let mut threads = Vec::new();
    let mut progress = Vec::new();
    for (index, mut peer) in peers.into_iter().enumerate() {
        let bar = bars.add(ProgressBar::new(options.target_batch_size));
        bar.set_style(style.clone());
        bar.set_prefix(format!("peer {}", index + 1));
        progress.push(bar);
        let (train_set, validation, flags, stop, events) = (
            train_set.clone(),
            validation.clone(),
            args.flags.clone(),
            stop.clone(),
            events.clone(),
        );
        let mut model = Mlp::new(&model_spec)?;
        let handle = runtime.handle().clone();
        threads.push(std::thread::spawn(move || {
            let seed = 1000 + index as u64;
            let summary = train(
                &mut peer,
                &mut model,
                (&train_set, &validation),
                &flags,
                seed,
                &stop,
                |event| {
                    let _ = events.send((index, event));
                },
            );
            handle.block_on(peer.optimizer.shutdown());
            (summary, peer)
        }));
    }
    drop(events);

    let mut curves: Vec<Vec<(f64, f64)>> = vec![Vec::new(); progress.len()];
    let mut validation_curve: Vec<(f64, f64)> = Vec::new();
    for (index, event) in received {
        let bar = &progress[index];
        match event {
            Event::Step { epoch, samples, loss } => {
                bar.set_position(samples.min(target_batch_size));
                bar.set_message(format!("epoch {epoch:>3}  loss {loss:.3}"));
            }
            Event::Epoch {
                epoch,
                loss,
                validation,
            } => {
                curves[index].push((epoch as f64, f64::from(loss)));
                if let Some(evaluation) = validation {
                    if index == 0 {
                        validation_curve.push((epoch as f64, f64::from(evaluation.loss)));
                    }
                    bar.println(format!(
                        "peer {} epoch {epoch:>3}: validation loss {:.3}, accuracy {:.1} %",
                        index + 1,
                        evaluation.loss,
                        evaluation.accuracy * 100.0
                    ));
                }
            }
            Event::Loaded(epoch) => bar.println(format!("peer {} loaded the state of epoch {epoch}", index + 1)),
            Event::StateRound { .. } => {}
        }
    }
    let mut summaries: Vec<Summary> = Vec::new();
    let mut finished = Vec::new();
    for thread in threads {
        let (summary, peer) = thread
            .join()
            .map_err(|_| anyhow::anyhow!("a training thread panicked"))?;
        summaries.push(summary?);
        finished.push(peer);
    }
    for bar in &progress {
        bar.finish();
    }
    let elapsed = started.elapsed().as_secs_f64();
    runtime.block_on(async {
        for peer in &finished {
            peer.membership.leave().await;
        }
    });

    println!();
    println!("peer  epochs  samples/s  val. loss  accuracy  grad rounds  state rounds  failures  loads");
    for (index, summary) in summaries.iter().enumerate() {
        let evaluation = summary.validation.unwrap_or(colony_examples::Evaluation {
            loss: f32::NAN,
            accuracy: f32::NAN,
        });
        println!(
            "{:>4}  {:>6}  {:>9.0}  {:>9.4}  {:>7.1} %  {:>11}  {:>12}  {:>8}  {:>5}",
            index + 1,
            summary.epochs,
            summary.samples as f64 / summary.seconds.max(1e-9),
            evaluation.loss,
            evaluation.accuracy * 100.0,
            summary.gradient_rounds,
            summary.state_rounds,
            summary.failures,
            summary.loads
        );
    }
    let total: u64 = summaries.iter().map(|s| s.samples).sum();
    println!(
        "\n{:.1} s, {} samples in all ({:.0} samples/s for the swarm)",
        elapsed,
        total,
        total as f64 / elapsed
    );

    let mut series: Vec<Series> = curves
        .into_iter()
        .enumerate()
        .map(|(index, points)| Series {
            label: format!("peer {} training loss", index + 1),
            points,
        })
        .collect();
    series.push(Series {
        label: "validation loss".into(),
        points: validation_curve,
    });
    plot_loss_curves(&args.plot, "Colony demo: loss by epoch", "epoch", &series)?;
    println!("loss curves: {}", args.plot.display());
    Ok(())
}
