# R's colnames(model.matrix(...)) and values for the formulas of r_colnames.json.
#
#   Rscript tests/formula/make_r_colnames.R      (run from the repository root)
#
# Reads tests/formula/r_colnames_data.csv (or the case's "data", another CSV there) and the
# "formula" of every case in tests/formula/r_colnames.json, and writes back R's column names
# and the model matrix (column by column) of the fixed part (lme4::nobars), for
# tests/formula/test_formula_r.py; for a case with "data", also its random terms (grouping
# and effects, lme4::lFormula's reTrms$cnms, in lme4's order).  A case with
# "strings_as_factors": true reads the text columns as factors (R's C() needs a factor:
# C(grp, contr.sum) on a character column is an error in R; mpiblmm codes a text column as
# that factor).  A case with "known_difference" is one mpiblmm codes otherwise, on purpose
# (test_formula_r.py says how).  A case with "check_names": false reads the table with
# check.names = FALSE (the columns keep names that are not syntactic, `age at scan`, written
# in backticks in the formula); the others get read.csv's names (make.names: age.at.scan).
library(jsonlite)
library(lme4)
folder <- "tests/formula"
ref <- fromJSON(file.path(folder, "r_colnames.json"), simplifyVector = FALSE)
control <- lmerControl(check.nobs.vs.nRE = "ignore", check.nobs.vs.nlev = "ignore",
                       check.nobs.vs.rankZ = "ignore")
for (i in seq_along(ref$cases)) {
  data <- ref$cases[[i]]$data
  d <- read.csv(file.path(folder, if (is.null(data)) "r_colnames_data.csv" else data),
                stringsAsFactors = isTRUE(ref$cases[[i]]$strings_as_factors),
                check.names = !isFALSE(ref$cases[[i]]$check_names))
  d$y <- seq_len(nrow(d))
  f <- as.formula(ref$cases[[i]]$formula)
  mm <- model.matrix(lme4::nobars(f), d)
  ref$cases[[i]]$names <- I(colnames(mm))
  ref$cases[[i]]$X <- unname(lapply(seq_len(ncol(mm)), function(j) I(as.vector(mm[, j]))))
  if (!is.null(data)) {
    cnms <- lFormula(f, d, control = control)$reTrms$cnms
    ref$cases[[i]]$random <- unname(lapply(seq_along(cnms), function(k)
      list(grouping = names(cnms)[k], effects = I(cnms[[k]]))))
  }
}
ref$R <- R.version.string
ref$lme4 <- as.character(packageVersion("lme4"))
writeLines(toJSON(ref, auto_unbox = TRUE, digits = NA, pretty = TRUE),
           file.path(folder, "r_colnames.json"))
