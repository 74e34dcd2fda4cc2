# R's grouping levels and coding of columns read.csv reads as numbers or logicals, for
# tests/formula/test_labels_r.py:
#
#   Rscript tests/formula/make_r_labels.R      (run from the repository root)
#
# Reads tests/formula/r_labels_data.csv (codes written "01", "1", "10"; "1", "1.0", "01",
# "2", "2.50"; logicals written T/F, and TRUE/true/false: text to R 4.2.2) and the "formula"
# of every case in tests/formula/r_labels.json (a case with "data": that table, by read.csv2:
# ';' between cells, ',' the decimal mark), and writes back lme4::lFormula's X (names
# and values) and, per random term (lme4's order), its grouping, effects (cnms), the level
# of each row (flist) and the term's Z (t(Ztlist), columns level by level, effects within).
library(jsonlite)
library(lme4)
folder <- "tests/formula"
ref <- fromJSON(file.path(folder, "r_labels.json"), simplifyVector = FALSE)
control <- lmerControl(check.nobs.vs.nRE = "ignore", check.nobs.vs.nlev = "ignore",
                       check.nobs.vs.rankZ = "ignore")
for (i in seq_along(ref$cases)) {
  data <- ref$cases[[i]]$data    # r_labels_csv2_data.csv: European CSV, read.csv2's
  d <- if (is.null(data)) read.csv(file.path(folder, "r_labels_data.csv")) else
    read.csv2(file.path(folder, data))
  d$y <- seq_len(nrow(d))
  lf <- lFormula(as.formula(ref$cases[[i]]$formula), d, control = control)
  ref$cases[[i]]$names <- I(colnames(lf$X))
  ref$cases[[i]]$X <- unname(lapply(seq_len(ncol(lf$X)), function(j) I(unname(lf$X[, j]))))
  rt <- lf$reTrms
  ref$cases[[i]]$random <- unname(lapply(seq_along(rt$cnms), function(k) {
    g <- names(rt$cnms)[k]
    Z <- t(as.matrix(rt$Ztlist[[k]]))
    list(grouping = g, effects = I(rt$cnms[[k]]), rows = I(as.character(rt$flist[[g]])),
         columns = I(unname(colnames(Z))),
         Z = unname(lapply(seq_len(ncol(Z)), function(j) I(unname(Z[, j])))))
  }))
}
ref$R <- R.version.string
ref$lme4 <- as.character(packageVersion("lme4"))
writeLines(toJSON(ref, auto_unbox = TRUE, digits = NA, pretty = TRUE),
           file.path(folder, "r_labels.json"))
