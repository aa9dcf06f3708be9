//! Turning a request's raw inputs into what a model consumes: decoded images, the rendered chat
//! template. Family-specific image processors live with their models (`models::*::processor`).

pub mod image;
pub mod template;
