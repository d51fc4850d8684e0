//! Colony test helpers.
