//! goemo's stages: one thin adapter per stage kind from the [`goemo_stage::Stage`] trait to the
//! libraries that do the work ([`goemo_data`], [`goemo_nn`], [`goemo_report`]), and the
//! [`registry`] of every kind that the binary hands to the engine. A stage reads its inputs and
//! typed params and writes into the folders it is given; it knows nothing about caching.

pub mod command;
pub mod distill;
pub mod evaluate;
pub mod load;
pub mod package;
pub mod plot;
pub mod predict;
pub mod report;
pub mod runtime;
pub mod sample;
pub mod scoring;
pub mod thresholds;
pub mod tokenize;
pub mod trainer;

use std::sync::Arc;

use goemo_stage::Registry;

/// Every stage kind, in pipeline order.
pub fn registry() -> Registry {
    Registry::new(vec![
        Arc::new(load::LoadStage),
        Arc::new(sample::SampleStage),
        Arc::new(tokenize::TokenizeStage),
        Arc::new(trainer::TrainStage),
        Arc::new(distill::DistillStage),
        Arc::new(thresholds::ThresholdsStage),
        Arc::new(evaluate::EvaluateStage),
        Arc::new(package::PackageStage),
        Arc::new(report::ReportStage),
        Arc::new(plot::PlotStage),
        Arc::new(command::CommandStage),
    ])
}
