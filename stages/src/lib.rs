//! goemo's stages: the [`Stage`] trait, the [`registry`] the engine looks kinds up in, and one
//! module per stage kind. Stages know nothing about caching; the engine knows nothing about ML.

pub mod backprop;
pub mod charts;
pub mod command;
pub mod data;
pub mod evaluate;
pub mod fetch;
pub mod infer;
pub mod load;
pub mod metrics;
pub mod model;
pub mod plot;
pub mod predict;
pub mod report;
pub mod runtime;
pub mod sample;
pub mod stage;
pub mod thresholds;
pub mod tokenize;
pub mod tokens;
pub mod train;

#[doc(hidden)]
pub mod testing;

pub use stage::{
    read_json, resolve_typed, write_atomic, write_json, Cancelled, InputSpec, Inputs, ParamError,
    RunRecord, Stage, StageContext, StageRecord,
};

/// Every stage kind, in pipeline order.
pub fn registry() -> Vec<Box<dyn Stage>> {
    vec![
        Box::new(load::LoadStage),
        Box::new(sample::SampleStage),
        Box::new(tokenize::TokenizeStage),
        Box::new(train::TrainStage),
        Box::new(thresholds::ThresholdsStage),
        Box::new(evaluate::EvaluateStage),
        Box::new(report::ReportStage),
        Box::new(plot::PlotStage),
        Box::new(command::CommandStage),
    ]
}

/// Look a kind up by its pipeline.yaml name.
pub fn find(kind: &str) -> Option<Box<dyn Stage>> {
    registry().into_iter().find(|s| s.kind() == kind)
}
