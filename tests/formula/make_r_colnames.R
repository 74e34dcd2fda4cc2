# R's colnames(model.matrix(...)) and values for the formulas of r_colnames.json.
#
#   Rscript tests/formula/make_r_colnames.R      (run from the repository root)
#
# Reads tests/formula/r_colnames_data.csv and the "formula" of every case in
# tests/formula/r_colnames.json, and writes back R's column names and the model matrix
# (column by column) of the fixed part (lme4::nobars), for tests/formula/test_formula_r.py.
library(jsonlite)
library(lme4)
folder <- "tests/formula"
d <- read.csv(file.path(folder, "r_colnames_data.csv"))
d$y <- seq_len(nrow(d))
ref <- fromJSON(file.path(folder, "r_colnames.json"), simplifyVector = FALSE)
for (i in seq_along(ref$cases)) {
  f <- as.formula(ref$cases[[i]]$formula)
  mm <- model.matrix(lme4::nobars(f), d)
  ref$cases[[i]]$names <- I(colnames(mm))
  ref$cases[[i]]$X <- unname(lapply(seq_len(ncol(mm)), function(j) I(as.vector(mm[, j]))))
}
ref$R <- R.version.string
ref$lme4 <- as.character(packageVersion("lme4"))
writeLines(toJSON(ref, auto_unbox = TRUE, digits = NA, pretty = TRUE),
           file.path(folder, "r_colnames.json"))
